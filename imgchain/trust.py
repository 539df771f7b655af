"""Backing files of images you did not make.

A qcow2 image names its backing file, and whoever opens the image reads that
file. When root opens an image that another user made, the image can name
`/etc/shadow` (format raw) and root would serve it to whoever reads the
chain: the class of the OpenStack advisories CVE-2024-32498 and
CVE-2026-24708. QEMU opens such files; imgchain does not, unless told to:
when the opener is root and the active image belongs to another user, every
file the chain reaches must be one that user could read (search permission
on each directory of its real path, read permission on the file, by owner,
group and other bits; POSIX ACLs are not consulted). `--trust-backing`
(`trust_backing=True`) turns the check off.
"""

from __future__ import annotations

import os
import pwd
import stat

from .errors import BackingError


def untrusted_owner(image: str) -> int | None:
    """The uid whose rights a chain of `image` is held to, None when none
    (the opener is not root, or root owns the image)."""
    if os.geteuid() != 0:
        return None
    try:
        owner = os.stat(image).st_uid
    except OSError:
        return None  # opening it reports the error
    return owner or None


def _groups(uid: int) -> set[int]:
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return set()
    return set(os.getgrouplist(entry.pw_name, entry.pw_gid))


def _allowed(st: os.stat_result, uid: int, groups: set[int], want: int) -> bool:
    """`want` is the "other" permission bit (4 read, 1 search)."""
    if st.st_uid == uid:
        return bool(st.st_mode & (want << 6))
    if st.st_gid in groups:
        return bool(st.st_mode & (want << 3))
    return bool(st.st_mode & want)


def unreadable_reason(path: str, uid: int) -> str | None:
    """Why `uid` could not read `path`, None if it could."""
    real = os.path.realpath(path)
    groups = _groups(uid)
    directory = os.path.dirname(real)
    ancestors = []
    while True:
        ancestors.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    for d in reversed(ancestors):
        if not _allowed(os.stat(d), uid, groups, 1):
            return f"directory '{d}' is not searchable by uid {uid}"
    st = os.stat(real)
    if not _allowed(st, uid, groups, 4):
        shown = f"'{real}'" if real == path else f"'{path}' (which is '{real}')"
        return (f"{shown} is not readable by uid {uid} (owner {st.st_uid}, group {st.st_gid}, "
                f"mode {stat.S_IMODE(st.st_mode):04o})")
    return None


def check_backing_trust(image: str, overlay: str, backing: str, uid: int) -> None:
    """Refuse `backing` (reached from `overlay` in the chain of `image`) if
    the image's owner `uid` could not read it."""
    try:
        reason = unreadable_reason(backing, uid)
    except OSError:
        return  # opening it reports the error
    if reason is not None:
        raise BackingError(
            f"{image}: refusing backing file '{backing}' of '{overlay}': the image belongs to "
            f"uid {uid}, who cannot read it ({reason}); pass --trust-backing if you trust this image")
