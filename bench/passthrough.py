"""The bare pyfuse3 + trio passthrough of one raw file: the speed limit of any pyfuse3 daemon.

The mount point is a regular file (inode 1 is the file itself, as with
`imgchain mount`); reads and writes are one os.pread/os.pwrite each, fsync is
os.fdatasync. Like imgchain it opens with direct_io and raises the connection's
max_background to 64 where it can. Not a product: no error translation beyond OSError.

    python bench/passthrough.py RAWFILE MOUNTPOINT      (SIGTERM/SIGINT unmount)
"""

import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio


class Passthrough(pyfuse3.Operations):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    async def getattr(self, inode, ctx=None):
        st, attr = os.fstat(self.fd), pyfuse3.EntryAttributes()
        attr.st_ino, attr.st_mode, attr.st_nlink = pyfuse3.ROOT_INODE, stat.S_IFREG | 0o644, 1
        attr.st_size, attr.st_uid, attr.st_gid, attr.st_blksize = st.st_size, st.st_uid, st.st_gid, 4096
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = st.st_mtime_ns
        return attr

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh, off, size):
        return os.pread(self.fd, size, off)

    async def write(self, fh, off, buf):
        try:
            return os.pwrite(self.fd, buf, off)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    async def fsync(self, fh, datasync):
        os.fdatasync(self.fd)


def raise_max_background(mountpoint: str) -> None:
    # pyfuse3 cannot set it; the stat must come from another thread (it is served by us).
    minor = os.minor(os.stat(mountpoint).st_dev)
    try:
        with open(f"/sys/fs/fuse/connections/{minor}/max_background", "w") as f:
            f.write("64")
    except OSError:
        pass  # fusectl not mounted, or not root: the default (12) stays, as in imgchain


async def serve(mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:
        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    return pyfuse3.terminate()
        nursery.start_soon(stop_on_signal)
        nursery.start_soon(trio.to_thread.run_sync, raise_max_background, mountpoint)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(raw: str, mountpoint: str) -> None:
    if not os.path.exists(mountpoint):
        open(mountpoint, "w").close()
    pyfuse3.init(Passthrough(raw), mountpoint, {"fsname=passthrough", "default_permissions"})
    try:
        trio.run(serve, mountpoint)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
