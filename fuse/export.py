"""The FUSE export: the chain's active node as one regular file (pyfuse3 + trio).

The mount point itself is the file (inode 1), as with `qemu-storage-daemon
--export type=fuse`. Reads and writes of any size and alignment go to the
core's `BlockBackend`; `fsync`/`fdatasync` flush the image files; the size is
the virtual size and cannot change, and the block count is what the chain's
image files take on disk. This is the only place that turns core
errors into errno values: every handler catches everything, because any
other exception escaping a handler would end `pyfuse3.main()` and the mount.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from typing import Any, Awaitable, Callable, TypeVar

import pyfuse3

from imgchain.backend import BlockBackend
from imgchain.errors import ImageIOError

log = logging.getLogger("imgchain.fuse")
T = TypeVar("T")
SMALL_READ = 64 * 1024  # reads up to this size get a buffer of their own


def _fuse_error(exc: BaseException, what: str) -> pyfuse3.FUSEError:
    """The errno a failed core call answers with (EIO when unexpected), logged."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    if isinstance(exc, ImageIOError):
        return pyfuse3.FUSEError(exc.errno or errno.EIO)
    if isinstance(exc, OSError):
        log.warning("%s: %s", what, exc)
        return pyfuse3.FUSEError(exc.errno or errno.EIO)
    log.error("%s failed", what, exc_info=exc)
    return pyfuse3.FUSEError(errno.EIO)


async def _translated(what: str, call: Callable[[], Awaitable[T]]) -> T:
    """Run a core call, mapping every error to a FUSEError."""
    try:
        return await call()
    except Exception as exc:  # noqa: BLE001 - nothing may escape a FUSE handler
        raise _fuse_error(exc, what) from None


class BlockExport(pyfuse3.Operations):
    """One regular file whose content is the backend's guest view."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, backend: BlockBackend, read_only: bool, owner: os.stat_result | None = None) -> None:
        super().__init__()
        self.backend = backend
        self.read_only = read_only
        self.mode = (owner.st_mode & 0o777) if owner else 0o644
        self.uid = owner.st_uid if owner else os.getuid()
        self.gid = owner.st_gid if owner else os.getgid()
        self.mtime_ns = self.ctime_ns = time.time_ns()
        self.draining = False
        self._read_buffer = bytearray(0)  # reused by large reads (_read_buffered)
        backend.dev_ops = self

    # -- drain hooks (imgchain.backend.BlockDevOps) -----------------------

    def drained_begin(self) -> None:
        self.draining = True  # the backend holds new requests back; nothing fails

    def drained_poll(self) -> bool:
        return False  # every request of ours is counted by the backend

    def drained_end(self) -> None:
        self.draining = False

    # -- attributes -------------------------------------------------------

    def _attributes(self) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = pyfuse3.ROOT_INODE
        attr.st_mode = stat.S_IFREG | (self.mode & (0o555 if self.read_only else 0o777))
        attr.st_nlink = 1
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.st_size = self.backend.size
        attr.st_blksize = 4096
        attr.st_blocks = self.backend.allocated_file_size() // 512  # what the chain takes on disk
        attr.st_atime_ns = attr.st_mtime_ns = self.mtime_ns
        attr.st_ctime_ns = self.ctime_ns
        attr.attr_timeout = attr.entry_timeout = 1.0
        return attr

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attributes()

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        if fields.update_size and attr.st_size != self.backend.size:
            raise pyfuse3.FUSEError(errno.EPERM)  # a block device's size is fixed
        if fields.update_mode:
            self.mode = attr.st_mode & 0o777
        if fields.update_uid:
            self.uid = attr.st_uid
        if fields.update_gid:
            self.gid = attr.st_gid
        if fields.update_mtime:
            self.mtime_ns = attr.st_mtime_ns
        self.ctime_ns = time.time_ns()
        return self._attributes()

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 512
        data.f_blocks = -(-self.backend.size // 512)
        data.f_namemax = 255
        return data

    # -- I/O --------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if self.read_only and flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        try:  # inline rather than _translated: this is the hottest path
            data = self.backend.read_now(off, size)
            if data is not None:
                return data
            if size <= SMALL_READ:
                return await self.backend.read(off, size)
            return await self._read_buffered(off, size)
        except Exception as exc:  # noqa: BLE001 - nothing may escape a FUSE handler
            raise _fuse_error(exc, f"read {off}+{size}") from None

    async def _read_buffered(self, off: int, size: int) -> memoryview:
        """A large read into a buffer kept from one request to the next, so
        that no megabyte is allocated (and page-faulted) per request. Sharing
        it is safe: `BlockBackend.read_into` awaits only before it starts
        filling, and pyfuse3 copies what a read handler returns into its
        reply before any other request runs."""
        if len(self._read_buffer) < size:
            self._read_buffer = bytearray(size)
        view = memoryview(self._read_buffer)
        return view[:await self.backend.read_into(off, view[:size])]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        size = self.backend.size
        if off >= size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        data = buf if off + len(buf) <= size else memoryview(buf)[:size - off]
        try:
            if not self.backend.write_now(off, data):
                await self.backend.write(off, data)
        except Exception as exc:  # noqa: BLE001 - nothing may escape a FUSE handler
            raise _fuse_error(exc, f"write {off}+{len(data)}") from None
        self.mtime_ns = time.time_ns()
        return len(data)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await _translated("fsync", self.backend.flush)

    async def flush(self, fh: int) -> None:
        return None  # close(2) does not imply durability; fsync does

    async def release(self, fh: int) -> None:
        return None
