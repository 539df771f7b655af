"""Image locks compatible with QEMU's (block/file-posix.c, raw_apply_lock_bytes).

QEMU marks each image file with open-file-description (OFD) read locks on
single bytes: byte 100+i for every permission i it holds, byte 200+i for every
permission it does not share with others. Before relying on them it tests the
opposite bytes with F_OFD_GETLK: another holder of 200+i means permission i
may not be taken, another holder of 100+i means i cannot be left unshared.
Holding the same bytes makes qemu-img/qemu-io and imgchain refuse each other
with clear messages. Locks go away with the file descriptor.
"""

from __future__ import annotations

import enum
import fcntl
import os
import struct

from .errors import ImgchainError

PERM_BASE = 100
SHARED_BASE = 200
_FLOCK = "hhqqi4x"  # struct flock on Linux x86_64/aarch64: type, whence, start, len, pid


class Perm(enum.IntEnum):
    """QEMU's BLK_PERM_* bits, by bit number."""

    CONSISTENT_READ = 0
    WRITE = 1
    WRITE_UNCHANGED = 2
    RESIZE = 3

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", " ")


ALL_PERMS = frozenset(Perm)
Perms = tuple[frozenset[Perm], frozenset[Perm]]
"""(permissions held, permissions shared with other users)."""
# What QEMU's nodes take and share (bdrv_default_perms): an active writable
# image holds read+write and shares no write; a backing image is read
# consistently with write and resize unshared; a read-only open shares all but write.
ACTIVE_WRITER = (frozenset({Perm.CONSISTENT_READ, Perm.WRITE, Perm.WRITE_UNCHANGED, Perm.RESIZE}),
                 frozenset({Perm.CONSISTENT_READ, Perm.WRITE_UNCHANGED}))
BACKING_READER = (frozenset({Perm.CONSISTENT_READ}),
                  frozenset({Perm.CONSISTENT_READ, Perm.WRITE_UNCHANGED}))
READER = (frozenset({Perm.CONSISTENT_READ}), frozenset(ALL_PERMS - {Perm.WRITE}))
NO_LOCKS = (frozenset(), ALL_PERMS)  # qemu-img -U (force share)


class ImageLockedError(ImgchainError):
    """Another process holds the image in a way that conflicts with this open."""


def _flock(kind: int, offset: int) -> bytes:
    return struct.pack(_FLOCK, kind, os.SEEK_SET, offset, 1, 0)


def _set(fd: int, kind: int, offset: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(kind, offset))


def _held_by_other(fd: int, offset: int) -> bool:
    result = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, offset))
    return struct.unpack(_FLOCK, result)[0] != fcntl.F_UNLCK


def apply_locks(fd: int, path: str, perms: Perms) -> None:
    """Take QEMU's lock bytes for (held, shared) on fd, then check for conflicts.

    Like QEMU, lock first and test after, so two racing openers cannot both
    win; on a conflict every byte is released again and ImageLockedError names
    the image and the permission."""
    held, shared = perms
    for perm in Perm:
        _set(fd, fcntl.F_RDLCK if perm in held else fcntl.F_UNLCK, PERM_BASE + perm)
        _set(fd, fcntl.F_RDLCK if perm not in shared else fcntl.F_UNLCK, SHARED_BASE + perm)
    conflict = _conflict(fd, held, shared)
    if conflict:
        release_locks(fd)
        raise ImageLockedError(f"{path}: {conflict}: the image is in use by another process "
                               f"(qemu or another imgchain)")


def _conflict(fd: int, held: frozenset[Perm], shared: frozenset[Perm]) -> str | None:
    for perm in Perm:
        if perm in held and _held_by_other(fd, SHARED_BASE + perm):
            return f'Failed to get "{perm.label}" lock'
        if perm not in shared and _held_by_other(fd, PERM_BASE + perm):
            return f'Failed to get shared "{perm.label}" lock'
    return None


def release_locks(fd: int) -> None:
    """Drop every QEMU lock byte this descriptor holds."""
    for perm in Perm:
        _set(fd, fcntl.F_UNLCK, PERM_BASE + perm)
        _set(fd, fcntl.F_UNLCK, SHARED_BASE + perm)
