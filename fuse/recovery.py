"""Dead mounts: an imgchain FUSE mount whose daemon died, recognised and cleared.

When a daemon dies without unmounting (kill -9, the OOM killer), the kernel
keeps its mount: every request to the mount point fails with ENOTCONN
("Transport endpoint is not connected") or ECONNABORTED. `is_dead_mount` recognises one of
imgchain's (filesystem type fuse.imgchain, connection gone), `detach` removes
it with `fusermount3 -u -z` (root or the user who mounted it), and
`recover` also deletes what the daemon left: its record, its QMP socket,
and the mount point file if the daemon had created it.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess

from imgchain.errors import ImgchainError
from imgchain.runtime import MountRecord, mounted_fstype, remove_record_files

FSTYPE = "fuse.imgchain"
DEAD_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)


def connection_dead(path: str) -> bool:
    """True if `path` is a FUSE mount whose daemon is gone (ENOTCONN, or ECONNABORTED
    once the kernel has aborted the connection). statfs, unlike stat, is never
    answered from the kernel's attribute cache."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno in DEAD_ERRNOS
    return False


def is_imgchain_mount(path: str) -> bool:
    return mounted_fstype(path) == FSTYPE


def is_dead_mount(path: str) -> bool:
    return is_imgchain_mount(path) and connection_dead(path)


def detach(path: str) -> None:
    """Lazily unmount the FUSE mount on `path`."""
    proc = subprocess.run(["fusermount3", "-u", "-z", os.path.abspath(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["fusermount3 failed"])[-1]
        raise ImgchainError(f"{path}: cannot detach the dead mount: {reason}")


def _remove_created_mountpoint(path: str) -> None:
    """The empty file a dead daemon had created to mount over (nothing else)."""
    try:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) and st.st_size == 0 and st.st_uid == os.geteuid():
            os.unlink(path)
    except OSError:
        pass


def recover(mountpoint: str, record: MountRecord | None) -> bool:
    """Clear a dead imgchain mount on `mountpoint` and its daemon's leftovers.

    Returns True if a mount was detached. The caller has checked that the
    record's daemon is not running."""
    detached = False
    if is_dead_mount(mountpoint):
        detach(mountpoint)
        detached = True
    if record is not None:
        if record.created_mountpoint and not is_imgchain_mount(mountpoint):
            _remove_created_mountpoint(mountpoint)
        remove_record_files(record)
    return detached
