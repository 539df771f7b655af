"""Opening images and backing chains the way QEMU does.

Backing names are resolved against the directory of the overlay as it was
named (ref: path_combine), a `proto:` prefix is refused, the backing format
comes from the header and is probed only when absent, backing nodes are
opened read-only, and a chain that reaches the same file twice (by device and
inode) is refused. `Chain` is the synchronous Python API on top
(`imgchain.open_chain`).
"""

from __future__ import annotations

import errno
import os
import re
import resource
from types import TracebackType

from imgchain.formats import UnsupportedFeature, probe_format
from imgchain.formats.probe import QCOW2_PROBE_SIZE

from .blockfile import BlockFile
from .errors import BackingError, ImgchainError
from .locks import ACTIVE_WRITER, BACKING_READER, READER, Perms, apply_locks
from .node import Node, attach_backing
from .qcow2 import Qcow2Driver
from .raw import RawDriver
from .trust import check_backing_trust, untrusted_owner

DRIVERS = {"qcow2": Qcow2Driver, "raw": RawDriver}
_PROTOCOL = re.compile(r"^([^:/\\]+):")


def protocol_of(name: str) -> str | None:
    """The protocol prefix of a backing name (`nbd:...`), as QEMU parses it."""
    m = _PROTOCOL.match(name)
    return m.group(1) if m else None


def resolve_backing_name(overlay: str, name: str) -> str:
    """The path QEMU opens for backing name `name` of image `overlay`."""
    if os.path.isabs(name) or protocol_of(name):
        return name
    return overlay[:overlay.rfind("/") + 1] + name  # ref: path_combine, purely lexical


class OpenFileLimit(ImgchainError):
    """The process may open no more files (EMFILE), even after raising its limit."""


def _open_file(path: str, writable: bool, lock: Perms | None) -> BlockFile:
    """Open one image file; at the open-file limit, raise the soft limit to
    the hard one (as QEMU does at start-up) and try once more."""
    for retry in (True, False):
        try:
            return BlockFile(path, writable, lock)
        except OSError as exc:
            if exc.errno != errno.EMFILE:
                raise ImgchainError(f"Could not open '{path}': {exc.strerror}") from None
            if not (retry and raise_open_file_limit()):
                raise OpenFileLimit(f"Could not open '{path}': {exc.strerror}") from None
    raise AssertionError("unreachable")


def raise_open_file_limit() -> bool:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; False if it already was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return False
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return False
    return True


def open_image(path: str, writable: bool = False, fmt: str | None = None,
               node_name: str | None = None, lock: Perms | None | str = "default") -> Node:
    """Open one image as a node, without its backing.

    It takes QEMU's image locks: `lock` is (held, shared) permissions, None
    for none (qemu-img -U), and by default those of an active image (a writer
    sharing no write, or a consistent reader)."""
    if lock == "default":
        lock = ACTIVE_WRITER if writable else READER
    file = _open_file(path, writable, lock)  # type: ignore[arg-type]
    try:
        if fmt is None:
            fmt = probe_format(file.pread(0, QCOW2_PROBE_SIZE))
        if fmt not in DRIVERS:
            raise UnsupportedFeature(path, f"image format '{fmt}' is not supported (qcow2, raw)")
        driver = DRIVERS[fmt](file, path)
    except BaseException:
        file.close()
        raise
    return Node(node_name or node_name_for(path), path, driver)


def backing_name_for(overlay: Node, backing: Node) -> str:
    """The name a job writes into `overlay`'s header for `backing`: absolute
    when the backing was opened by an absolute path (as QEMU writes its
    filename), else relative to the overlay's directory, so the header
    resolves to the same file whatever directory the daemon runs in."""
    if os.path.isabs(backing.filename):
        return backing.filename
    return os.path.relpath(os.path.abspath(backing.filename), os.path.dirname(os.path.abspath(overlay.filename)))


def reopen_node(node: Node, writable: bool) -> None:
    """Reopen a node's image read-write (a job's target) or read-only again
    (a backing), in place: QEMU's bdrv_reopen. Metadata is written back and
    the old descriptor closed before the new driver reads the tables; the
    locks become those of a writer or of a backing. Call it drained: devices
    must forget the old descriptor (BlockBackend.reopened)."""
    if node.writable == writable:
        return
    path, fmt = node.filename, node.format_name
    file = _open_file(path, writable, None)
    node.driver.close()  # writes back and frees reserved clusters; its locks go with its fd
    try:
        apply_locks(file.fd, path, ACTIVE_WRITER if writable else BACKING_READER)
        node.driver = DRIVERS[fmt](file, path)
    except BaseException:
        file.close()
        # as it was: a refused reopen changes nothing
        node.driver = DRIVERS[fmt](_open_file(path, not writable, BACKING_READER if writable
                                              else ACTIVE_WRITER), path)
        raise


def node_name_for(path: str) -> str:
    """The node name of an image: its file name without the last extension."""
    base = os.path.basename(path)
    stem = os.path.splitext(base)[0]
    return stem or base or "node"


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    taken.add(candidate)
    return candidate


def _file_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def open_backing_chain(path: str, writable: bool = False, fmt: str | None = None,
                       force_share: bool = False, trust_backing: bool = False) -> Node:
    """Open `path` and every backing file below it; returns the active node.

    Only the active node is writable; backing nodes are read-only and locked
    as QEMU locks them (consistent read, write unshared). `force_share` takes
    no locks at all (qemu-img -U). Unless `trust_backing`, root opens no
    backing file that the owner of `path` could not read (imgchain.trust)."""
    owner = None if trust_backing else untrusted_owner(path)
    taken: set[str] = set()
    top = open_image(path, writable, fmt, _unique(node_name_for(path), taken),
                     None if force_share else "default")
    seen = {_file_id(path)}
    node = top
    try:
        while node.driver.backing_file:
            below = _open_backing(node, seen, taken, None if force_share else BACKING_READER,
                                  (path, owner))
            attach_backing(node, below)
            node = below
    except OpenFileLimit:
        close_chain(top)
        raise OpenFileLimit(_file_limit_message(path)) from None
    except BaseException:
        close_chain(top)
        raise
    return top


def _file_limit_message(path: str) -> str:
    """Why a chain cannot be opened at the open-file limit, and by how much:
    its length (counted header by header, one file open at a time) against
    the limit, with the files the process holds anyway."""
    images, name = 0, path
    seen: set[tuple[int, int]] = set()
    while name:
        try:
            ident = _file_id(name)
            if ident in seen:
                break
            seen.add(ident)
            node = open_image(name, lock=None)
        except (ImgchainError, UnsupportedFeature, OSError):
            images += 1  # the rest of the chain is not counted; the open reports it
            break
        images += 1
        backing = node.driver.backing_file
        node.close()
        name = resolve_backing_name(name, backing) if backing and not protocol_of(backing) else ""
    held = len(os.listdir("/proc/self/fd")) - 1  # the listing's own descriptor
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return (f"{path}: a chain of {images} images needs about {images + held} open files; "
            f"the limit is {soft} (ulimit -n)")


def _open_backing(overlay: Node, seen: set[tuple[int, int]], taken: set[str],
                  lock: Perms | None, trust: tuple[str, int | None]) -> Node:
    """The backing node of `overlay`; `trust` is (the chain's active image,
    the owner whose rights the chain is held to, or None)."""
    name = overlay.driver.backing_file or ""
    proto = protocol_of(name)
    if proto and not os.path.isabs(name):
        raise BackingError(f"Could not open backing file '{name}' of '{overlay.filename}': "
                           f"Unknown protocol '{proto}' (write './{name}' for a file name)")
    path = resolve_backing_name(overlay.filename, name)
    try:
        ident = _file_id(path)
    except OSError as exc:
        raise BackingError(f"Could not open backing file of '{overlay.filename}': "
                           f"'{path}': {exc.strerror}") from None
    if ident in seen:
        raise BackingError(f"Backing file '{name}' creates an infinite loop")
    seen.add(ident)
    image, owner = trust
    if owner is not None:
        check_backing_trust(image, overlay.filename, path, owner)
    fmt = overlay.driver.backing_format
    return open_image(path, False, fmt, _unique(node_name_for(path), taken), lock)


def close_chain(top: Node) -> None:
    """Close every node of a chain."""
    for node in top.chain():
        node.close()


class Chain:
    """An opened backing chain, named by its active image (the Python API)."""

    def __init__(self, path: str, writable: bool = False, force_share: bool = False,
                 trust_backing: bool = False) -> None:
        self.active = open_backing_chain(path, writable, force_share=force_share,
                                         trust_backing=trust_backing)

    @property
    def size(self) -> int:
        """Virtual size in bytes."""
        return self.active.size

    @property
    def nodes(self) -> list[Node]:
        """The images of the chain, active first."""
        return self.active.chain()

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Guest-visible content."""
        self.active._check_range(offset, length)
        return self.active.read(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Copy-on-write into the active image."""
        self.active.write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero a range; zero clusters where whole clusters are covered."""
        self.active.write_zeroes(offset, length)

    def flush(self) -> None:
        """Make everything written durable in the image files."""
        self.active.flush()

    def close(self) -> None:
        close_chain(self.active)

    def __enter__(self) -> "Chain":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.flush()
        self.close()


def open_chain(path: str | os.PathLike[str], writable: bool = False,
               force_share: bool = False, trust_backing: bool = False) -> Chain:
    """Open the chain whose active image is `path`, taking QEMU's image locks
    (a writer that shares no write, or a consistent reader; none with
    `force_share`). Run as root on another user's image, it refuses backing
    files that user could not read unless `trust_backing` (imgchain.trust)."""
    return Chain(os.fspath(path), writable, force_share, trust_backing)
