"""The mount daemon process: open the chain, mount the export, serve QMP, tear down cleanly.

`run_mount` does the whole life of one mount inside one trio loop: it opens
the chain with its locks (imgchain.daemon.Daemon), mounts the FUSE export on
the mount point file, serves the QMP socket, writes the runtime record once
the file is live, and reports readiness. It ends on QMP `quit`, SIGTERM,
SIGINT, or an external unmount (`umount`, `fusermount3 -u`), and then always
unmounts, flushes, closes the images (releasing the locks) and removes its
record and socket. Run as `python -P -m imgchain.fuse.daemon` by `imgchain mount`.

When the mount cannot be made, the error names libfuse's or fusermount3's
reason (they print it on stderr, which is captured around the mount). Once
mounted, it raises the connection's `max_background` (FUSE's queue of
asynchronous requests, 12 by default) to 64 through the fusectl filesystem,
mounting fusectl first when it is missing and the daemon runs as root (as
systemd does at boot); the effective value goes into the record.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile
from typing import Callable

import pyfuse3
import trio

from imgchain import metacache, preallocate
from imgchain.daemon import Daemon
from imgchain.errors import USER_ERRORS, ImgchainError
from imgchain.runtime import MountRecord, mounted_fstype, remove_record, runtime_dir, write_record

from .export import BlockExport
from .options import MountOptions

log = logging.getLogger("imgchain.fuse")
MAX_BACKGROUND = 64
STOP_JOBS_SECONDS = 10  # how long an unmount waits for cancelled jobs to end
FUSECTL = "/sys/fs/fuse/connections"


def _is_mounted(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def prepare_mountpoint(path: str) -> bool:
    """Check (or create) the regular file to mount over; True if we created it."""
    if os.path.lexists(path):
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ImgchainError(f"{path}: the mount point must be a regular file")
        if _is_mounted(path):
            raise ImgchainError(f"{path}: is already a mount point")
        return False
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except OSError as exc:
        raise ImgchainError(f"{path}: cannot create the mount point: {exc.strerror}") from None
    return True


def _fuse_options(opts: MountOptions) -> set[str]:
    options = set(pyfuse3.default_options) | {"fsname=imgchain", "subtype=imgchain"}
    if opts.allow_other:
        options.add("allow_other")
    return options


def mount_fusectl() -> None:
    """Mount the FUSE control filesystem where it is missing (root only, as systemd does)."""
    if os.geteuid() != 0 or not os.path.isdir(FUSECTL) or mounted_fstype(FUSECTL) == "fusectl":
        return
    proc = subprocess.run(["mount", "-t", "fusectl", "none", FUSECTL], capture_output=True, text=True)
    if proc.returncode == 0:
        log.info("fusectl was not mounted: mounted it on %s", FUSECTL)
    else:
        log.warning("cannot mount fusectl on %s: %s", FUSECTL, proc.stderr.strip())


def raise_max_background(mountpoint: str) -> int | None:
    """Raise the connection's max_background (pyfuse3 cannot; its fusectl file can,
    for root); returns the effective value, None when it cannot be read."""
    mount_fusectl()
    path = f"{FUSECTL}/{os.minor(os.stat(mountpoint).st_dev)}/max_background"
    try:
        with open(path, "w") as f:
            f.write(str(MAX_BACKGROUND))
    except OSError as exc:
        log.info("max_background not raised: %s", exc)
    try:
        with open(path) as f:
            value = int(f.read())
    except (OSError, ValueError) as exc:
        log.info("max_background unknown: %s", exc)
        return None
    log.info("max_background is %d (%s)", value, path)
    return value


async def _announce(opts: MountOptions, daemon: Daemon, socket: str, created: bool,
                    ready: Callable[[str], None]) -> None:
    # A stat from another thread proves the kernel sees the file through us.
    max_background = await trio.to_thread.run_sync(raise_max_background, opts.mountpoint)
    record = MountRecord.for_this_process(
        mountpoint=os.path.abspath(opts.mountpoint), image="", socket=socket, device=opts.device,
        read_only=opts.read_only, created_mountpoint=created, max_background=max_background,
        cache_size=metacache.cache_size(), prealloc_size=preallocate.prealloc_size())

    def write_current() -> None:
        """The record shows the chain as it is now (after a pivot, a snapshot, a stream)."""
        record.image = os.path.abspath(daemon.backend.root.filename)
        record.nodes = [{"node-name": n.node_name, "file": os.path.abspath(n.filename), "format": n.format_name}
                        for n in daemon.nodes]
        write_record(record)

    write_current()
    daemon.graph.listeners.append(write_current)
    ready(socket)


async def _stop_on(daemon: Daemon) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            daemon.quit_requested.set()
            return


async def _terminate_when_asked(daemon: Daemon) -> None:
    await daemon.quit_requested.wait()
    daemon.stop_jobs()
    with trio.move_on_after(STOP_JOBS_SECONDS):  # cancelled jobs abort: chains as they were
        await daemon.jobs.wait_all_done()
    pyfuse3.terminate()


async def _serve(opts: MountOptions, daemon: Daemon, socket: str, created: bool,
                 ready: Callable[[str], None]) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve, socket)
        nursery.start_soon(_announce, opts, daemon, socket, created, ready)
        nursery.start_soon(_stop_on, daemon)
        nursery.start_soon(_terminate_when_asked, daemon)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def run_mount(opts: MountOptions, ready: Callable[[str], None]) -> None:
    """Mount and serve until told to stop; raises a user error if it cannot start."""
    created = prepare_mountpoint(opts.mountpoint)
    socket = opts.qmp or os.path.join(runtime_dir(), f"mount-{os.getpid()}.qmp")
    metacache.set_cache_size(opts.cache_size)  # before any image is opened
    preallocate.set_prealloc_size(opts.prealloc_size)
    try:
        daemon = Daemon(opts.image, opts.read_only, opts.device, opts.trust_backing)
    except BaseException:
        if created:
            os.unlink(opts.mountpoint)
        raise
    try:
        export = BlockExport(daemon.backend, opts.read_only, os.stat(opts.mountpoint))
        mount_export(export, opts)
        try:
            trio.run(_serve, opts, daemon, socket, created, ready)
        finally:
            _unmount()
    finally:
        daemon.close()
        remove_record(os.getpid())
        _remove_own_file(socket, stat.S_IFSOCK)
        if created:
            _remove_own_file(opts.mountpoint, stat.S_IFREG)


def _remove_own_file(path: str, kind: int) -> None:
    """Delete a file this daemon made (its socket, its mount point) if it still is one."""
    try:
        if stat.S_IFMT(os.lstat(path).st_mode) == kind:
            os.unlink(path)
    except OSError:
        pass


def mount_export(export: BlockExport, opts: MountOptions) -> None:
    """pyfuse3.init, with libfuse's or fusermount3's reason in the error when it fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as said:
        os.dup2(said.fileno(), 2)  # fusermount3 is a child: it writes to our fd 2
        try:
            pyfuse3.init(export, opts.mountpoint, _fuse_options(opts))
            failure = None
        except RuntimeError as exc:
            failure = exc
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        said.seek(0)
        text = said.read()
    os.write(2, text)  # the log keeps it too
    if failure is not None:
        lines = [line.strip() for line in text.decode(errors="replace").splitlines() if line.strip()]
        reason = lines[-1] if lines else str(failure)
        raise ImgchainError(f"{opts.mountpoint}: cannot mount: {reason}")


def _unmount() -> None:
    try:
        pyfuse3.close(unmount=True)
    except Exception as exc:  # noqa: BLE001 - already unmounted from outside
        log.info("unmount: %s", exc)


def _parse(argv: list[str]) -> tuple[MountOptions, int | None]:
    p = argparse.ArgumentParser(prog="imgchain-daemon")
    p.add_argument("image")
    p.add_argument("mountpoint")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--allow-other", action="store_true")
    p.add_argument("--qmp")
    p.add_argument("--device-name", default="drive0")
    p.add_argument("--trust-backing", action="store_true")
    p.add_argument("--cache-size", type=int, default=metacache.DEFAULT_CACHE_SIZE)
    p.add_argument("--prealloc-size", type=int, default=preallocate.DEFAULT_PREALLOC_SIZE)
    p.add_argument("--ready-fd", type=int)
    a = p.parse_args(argv)
    opts = MountOptions(a.image, a.mountpoint, a.read_only, a.allow_other, a.qmp, a.device_name, a.trust_backing,
                        a.cache_size, a.prealloc_size)
    return opts, a.ready_fd


def main(argv: list[str] | None = None) -> int:
    """Entry point of the background daemon: reports "OK socket" or "ERR message" on --ready-fd."""
    opts, ready_fd = _parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    pending = [ready_fd] if ready_fd is not None else []

    def report(line: str) -> None:
        while pending:  # once only: later errors go to the log
            fd = pending.pop()
            os.write(fd, (line + "\n").encode())
            os.close(fd)

    try:
        run_mount(opts, lambda socket: report(f"OK {socket}"))
    except USER_ERRORS as exc:
        log.error("%s", exc)
        report(f"ERR {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
