"""The runtime directory: one record per mount, and who a record's daemon is.

`$IMGCHAIN_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/imgchain`, else `/run/imgchain`
for root and `/tmp/imgchain-$UID` for others. It is created mode 0700, and
refused (one-line error) unless it is a real directory owned by the user with
mode 0700: in /tmp another user could create it first and plant records or
log symlinks in it.

A record is a JSON file written atomically by the daemon once its mount is
live and removed when it exits. It names the daemon by pid, start time
(/proc/PID/stat) and command line, so that a pid reused by an unrelated
process is never taken for the daemon: `daemon_running` is False for a
process that is gone, a zombie, or not the one that wrote the record, and
`signal_daemon` checks the same through a pidfd before signalling. Files are
opened without following symbolic links, and a record's files are deleted
only when they are inside the runtime directory and of the kind the record
says (a regular file for the record, a socket for the QMP socket).
"""

from __future__ import annotations

import json
import os
import signal
import stat
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ImgchainError

RECORD_PREFIX = "mount-"
RECORD_SUFFIX = ".json"


# -- the directory ------------------------------------------------------------

def runtime_dir(create: bool = True) -> str:
    """The runtime directory (created 0700 and checked when `create`)."""
    path = os.environ.get("IMGCHAIN_RUNTIME_DIR")
    if not path:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg:
            path = os.path.join(xdg, "imgchain")
        else:
            path = "/run/imgchain" if os.geteuid() == 0 else f"/tmp/imgchain-{os.getuid()}"
    path = os.path.abspath(path)
    if create:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ImgchainError(f"{path}: cannot create the runtime directory: {exc.strerror}") from None
        check_private(path)
    return path


def check_private(path: str) -> None:
    """Refuse a runtime directory that another user could have prepared."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory"
    elif st.st_uid != os.geteuid():
        problem = f"is owned by uid {st.st_uid}, not {os.geteuid()}"
    elif stat.S_IMODE(st.st_mode) != 0o700:
        problem = f"has mode {stat.S_IMODE(st.st_mode):04o}, not 0700"
    else:
        return
    raise ImgchainError(f"{path}: refusing this runtime directory: it {problem} "
                        "(remove it, or set IMGCHAIN_RUNTIME_DIR to a private directory)")


def _inside(path: str, directory: str) -> bool:
    return os.path.dirname(os.path.abspath(path)) == directory


def open_private(name: str, flags: int) -> int:
    """Open a file directly inside the runtime directory, never through a symlink."""
    return os.open(os.path.join(runtime_dir(), name), flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def create_log(name: str) -> int:
    """A new log file in the runtime directory (write-only fd, appending)."""
    return open_private(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND)


def remove_if(path: str, kind: int) -> bool:
    """Delete `path` if it is directly inside the runtime directory and of file type `kind`
    (stat.S_IFSOCK, stat.S_IFREG); anything else is left alone."""
    directory = runtime_dir()
    if not _inside(path, directory):
        return False
    try:
        if stat.S_IFMT(os.lstat(path).st_mode) != kind:
            return False
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


# -- processes ----------------------------------------------------------------

@dataclass(frozen=True)
class ProcessIdentity:
    """A process as /proc shows it: pid, state letter, start time (clock ticks after boot), argv."""

    pid: int
    state: str
    start_time: int
    cmdline: tuple[str, ...]

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        """The process `pid` now, or None when there is none."""
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return None
        return cls(pid, fields[0].decode(), int(fields[19]),
                   tuple(a.decode(errors="surrogateescape") for a in argv if a))

    @classmethod
    def of_self(cls) -> ProcessIdentity:
        me = cls.of(os.getpid())
        assert me is not None
        return me

    @property
    def running(self) -> bool:
        return self.state not in ("Z", "X")


# -- records ------------------------------------------------------------------

@dataclass
class MountRecord:
    """What the CLI needs to find a mount's daemon, know it is still that daemon, and talk to it."""

    pid: int
    mountpoint: str
    image: str
    socket: str
    device: str = "drive0"
    read_only: bool = False
    nodes: list[dict[str, Any]] = field(default_factory=list)
    start_time: int = 0  # from /proc/PID/stat; 0 (older records): the daemon cannot be identified
    cmdline: list[str] = field(default_factory=list)
    created_mountpoint: bool = False
    max_background: int | None = None
    cache_size: int | None = None  # the bound of the daemon's metadata caches, bytes (None: older records)
    prealloc_size: int | None = None  # bytes prepared past a growing qcow2 file's end (None: older records)

    @classmethod
    def for_this_process(cls, **values: Any) -> MountRecord:
        me = ProcessIdentity.of_self()
        return cls(pid=me.pid, start_time=me.start_time, cmdline=list(me.cmdline), **values)

    @property
    def path(self) -> str:
        return record_path(self.pid)

    def is_daemon(self, process: ProcessIdentity | None) -> bool:
        """True if `process` is this record's daemon, still running."""
        return (process is not None and process.running and bool(self.start_time)
                and process.start_time == self.start_time and list(process.cmdline) == self.cmdline)

    def daemon_running(self) -> bool:
        """The daemon that wrote the record runs (not gone, not a zombie, pid not reused)."""
        return self.is_daemon(ProcessIdentity.of(self.pid))

    def alive(self) -> bool:
        return self.daemon_running()

    def state(self) -> str:
        return "running" if self.daemon_running() else "dead"


def signal_daemon(record: MountRecord, signum: int = signal.SIGTERM) -> bool:
    """Signal the record's daemon if, and only if, it is still that daemon.

    The pidfd pins the process before it is identified, so the pid cannot be
    reused between the check and the signal. False when it is not there."""
    try:
        pidfd = os.pidfd_open(record.pid)
    except ProcessLookupError:
        return False
    try:
        if not record.is_daemon(ProcessIdentity.of(record.pid)):
            return False
        signal.pidfd_send_signal(pidfd, signum)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)


def record_path(pid: int) -> str:
    return os.path.join(runtime_dir(), f"{RECORD_PREFIX}{pid}{RECORD_SUFFIX}")


def write_record(record: MountRecord) -> None:
    """Write (or replace) a record atomically, never through a symlink."""
    tmp = record.path + ".tmp"
    try:
        os.unlink(tmp)  # a leftover of ours (a symlink is removed, not followed)
    except FileNotFoundError:
        pass
    fd = open_private(os.path.basename(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(record), f, indent=2)
    os.replace(tmp, record.path)


def remove_record(pid: int) -> None:
    remove_if(record_path(pid), stat.S_IFREG)


def remove_record_files(record: MountRecord) -> None:
    """A dead daemon's record and its QMP socket (if that is a socket in the runtime directory)."""
    remove_if(record.socket, stat.S_IFSOCK)
    remove_record(record.pid)


def _read_record(name: str) -> MountRecord | None:
    try:
        fd = open_private(name, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        with os.fdopen(fd) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            record = MountRecord(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None
    return record if name == os.path.basename(record.path) else None


def records() -> list[MountRecord]:
    """Every readable record, whatever the state of its daemon."""
    names = sorted(n for n in os.listdir(runtime_dir())
                   if n.startswith(RECORD_PREFIX) and n.endswith(RECORD_SUFFIX))
    return [r for r in map(_read_record, names) if r is not None]


def mounted_fstype(path: str) -> str | None:
    """The filesystem type mounted on `path` ("fuse.imgchain"), or None if nothing is."""
    real = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:  # the last match is the mount on top
            fields = line.split()
            if fields[4] == real:
                found = fields[fields.index("-") + 1]
    return found


def stale(record: MountRecord) -> bool:
    """A record whose daemon is dead and whose mount is gone: nothing is left to clean."""
    return not record.daemon_running() and mounted_fstype(record.mountpoint) != "fuse.imgchain"


def current_records() -> list[MountRecord]:
    """Records of running daemons and of dead mounts still in place; stale ones are deleted."""
    kept = []
    for record in records():
        if stale(record):
            remove_record_files(record)
        else:
            kept.append(record)
    return kept


def live_records() -> list[MountRecord]:
    """Records of running daemons (stale ones are deleted on the way)."""
    return [r for r in current_records() if r.daemon_running()]


def find_by_mountpoint(mountpoint: str) -> MountRecord | None:
    """The record of `mountpoint`, running or dead."""
    target = os.path.realpath(mountpoint)
    return next((r for r in records() if os.path.realpath(r.mountpoint) == target), None)
