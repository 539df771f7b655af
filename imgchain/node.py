"""Nodes and links of the block graph, and the guest I/O path through a chain.

A `Node` is one opened image (a qcow2 or raw driver over its file); a `Child`
is the backing link from an overlay (parent) to the node below it (child),
carrying the `frozen` flag and job blockers that later layers use. Guest
reads fall through the chain extent by extent; writes go to the node they are
issued on, with copy-on-write reading from below. This module never changes
links itself; graph changes live elsewhere and are all-or-nothing.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator, Protocol

from .blockfile import zero_fill
from .errors import ImageIOError
from .extent import Extent, Status


class Driver(Protocol):
    """What a format driver offers a node (qcow2.Qcow2Driver, raw.RawDriver)."""

    format_name: str
    filename: str
    size: int
    cluster_size: int | None
    backing_file: str | None
    backing_format: str | None

    def block_status(self, offset: int, length: int, want_zero: bool = True) -> list[Extent]: ...
    def write(self, offset: int, data: bytes | bytearray | memoryview, read_below: object) -> None: ...
    def write_zeroes(self, offset: int, length: int, read_below: object) -> None: ...
    def in_place_host(self, offset: int) -> int | None: ...
    def write_back(self) -> None: ...
    def write_back_steps(self) -> Iterator[None]: ...
    def allocation_at(self, offset: int, length: int) -> object | None: ...
    def begin_allocation(self, offset: int, data: bytes | bytearray | memoryview,
                         source: tuple[int, int] | None) -> object | None: ...
    def copy_on_write_now(self, offset: int, data: bytes | bytearray | memoryview,
                          cluster: bytearray) -> int | None: ...
    def flush(self) -> None: ...
    def change_backing_file(self, name: str | None, fmt: str | None) -> None: ...
    def close(self) -> None: ...


@dataclass(eq=False)
class Child:
    """The backing link parent -> child (QEMU's BdrvChild with the COW role).

    Invariant: a Child is in `child.parents` exactly while it is `parent.backing`
    (`attach_backing` and `detach_backing` keep both sides)."""

    parent: "Node"
    child: "Node"
    name: str = "backing"
    frozen: bool = False


async def wait_for_allocations(node: "Node", offset: int, length: int) -> None:
    """Wait until no cluster allocation of `node` is in flight in the guest
    range (QEMU's handle_dependencies; imgchain.backend starts them): a
    write that touches the range may then check and write without an await
    in between. The waiter is whatever event the backend gave the
    allocation (never one on a node with no device: nothing is in flight)."""
    while (meta := node.allocation_at(offset, length)) is not None:
        await meta.done.wait()  # type: ignore[attr-defined]


async def write_back_off_loop(node: "Node", sync: Callable[[], Awaitable[None]]) -> None:
    """Write `node`'s pending metadata back in its crash-safe steps, each
    ordering barrier and the final fdatasync done by `sync` (one in a
    worker thread) while guests may write between the steps."""
    for _ in node.write_back_steps():
        await sync()
    await sync()


def attach_backing(parent: "Node", child: "Node") -> Child:
    """Make `child` the backing of `parent` (which has none)."""
    assert parent.backing is None
    link = Child(parent=parent, child=child)
    parent.backing = link
    child.parents.append(link)
    return link


def detach_backing(parent: "Node") -> None:
    """Remove `parent`'s backing link (if any)."""
    link = parent.backing
    if link is not None:
        link.child.parents.remove(link)
        parent.backing = None


class Node:
    """An opened image in the graph (QEMU's BlockDriverState)."""

    def __init__(self, node_name: str, filename: str, driver: Driver) -> None:
        self.node_name = node_name
        self.filename = filename
        self.driver = driver
        self.backing: Child | None = None
        # Invariant: the backing links that point at this node (its overlays).
        self.parents: list[Child] = []
        # Job blockers (QEMU's op blockers): (owner, reason) while a job uses the node.
        self.blockers: list[tuple[object, str]] = []

    def __repr__(self) -> str:
        return f"<Node {self.node_name} {self.driver.format_name} {self.filename!r}>"

    @property
    def size(self) -> int:
        return self.driver.size

    @property
    def format_name(self) -> str:
        return self.driver.format_name

    @property
    def writable(self) -> bool:
        return bool(self.driver.file.writable)  # type: ignore[attr-defined]

    @property
    def backing_node(self) -> "Node | None":
        return self.backing.child if self.backing else None

    def chain(self) -> list["Node"]:
        """This node and everything below it, top first."""
        nodes: list[Node] = []
        node: Node | None = self
        while node is not None:
            nodes.append(node)
            node = node.backing_node
        return nodes

    # -- reads ------------------------------------------------------------
    #
    # Every walk down the chain is a loop over the layers, never a recursion,
    # so a chain of any depth reads (QEMU's bdrv_co_block_status_above loops
    # the same way).

    def chain_status(self, offset: int, length: int, want_zero: bool = True,
                     top: list[Extent] | None = None) -> Iterator[tuple["Node", Extent]]:
        """Where the guest range [offset, offset+length) of this node's chain is
        answered: (node, extent) with the extent DATA or COMPRESSED in that
        node's file, or ZERO; ZERO also stands for what no layer stores (below
        the bottom, past a backing's end). Layer by layer, top first; each layer
        is asked only about what the layers above leave unallocated. `top` is
        this node's own block status of the range, when the caller has it."""
        node: Node | None = self
        pending = [(offset, length)]
        while node is not None and pending:
            below = node.backing_node
            left: list[tuple[int, int]] = []
            for off, n in pending:
                inside = max(0, min(n, node.size - off))
                if top is not None:
                    extents, top = top, None
                else:
                    extents = node.driver.block_status(off, inside, want_zero) if inside else []
                for ext in extents:
                    if ext.status is not Status.UNALLOCATED:
                        yield node, ext
                    elif below is not None:
                        left.append((ext.guest_offset, ext.length))
                    else:
                        yield node, Extent(ext.guest_offset, ext.length, Status.ZERO)
                if inside < n:
                    yield node, Extent(off + inside, n - inside, Status.ZERO)
            node, pending = below, left

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Guest-visible bytes of this node (its chain), zeros past its end."""
        inside = max(0, min(length, self.size - offset))
        extents = self.driver.block_status(offset, inside, want_zero=False) if inside else []
        if inside == length and len(extents) == 1 and extents[0].status is Status.DATA:
            return self.driver.file.pread(extents[0].host_offset, length)  # type: ignore[attr-defined]
        out = bytearray(length)
        self._fill(offset, memoryview(out), extents)
        return out

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill a buffer with this node's guest bytes at offset (zeros past its end).

        Every layer reads straight into the caller's buffer (one copy per
        byte, however deep the chain); nothing of the buffer's old content
        is left, so a buffer can be used again without clearing it."""
        inside = max(0, min(len(view), self.size - offset))
        self._fill(offset, view, self.driver.block_status(offset, inside, want_zero=False) if inside else [])

    def _fill(self, offset: int, view: memoryview, extents: list[Extent]) -> None:
        """Fill `view` (guest bytes from `offset`) given this node's own extents."""
        for node, ext in self.chain_status(offset, len(view), False, extents):
            at = ext.guest_offset - offset
            part = view[at:at + ext.length]
            if ext.status is Status.DATA:
                node.driver.file.pread_into(ext.host_offset, part)  # type: ignore[attr-defined]
            elif ext.status is Status.COMPRESSED:
                cluster = node.driver.read_compressed(ext.guest_offset)  # type: ignore[attr-defined]
                start = ext.guest_offset % len(cluster)
                part[:] = cluster[start:start + ext.length]
            else:
                zero_fill(part)

    def reads_as_zero(self, offset: int, length: int) -> bool:
        """Does block status alone (no data read) show the range as zeros?"""
        return all(ext.status is Status.ZERO for _, ext in self.chain_status(offset, length))

    def read_below(self, offset: int, length: int) -> bytes | bytearray:
        """What this node's backing shows for a range: zeros where there is none."""
        below = self.backing_node
        if below is None:
            return bytes(length)
        return below.read(offset, length)

    # -- writes -----------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageIOError(
                f"{self.filename}: request {offset}+{length} is beyond the end of the image "
                f"({self.size} bytes)", errno.EINVAL)

    def write(self, offset: int, data: bytes | bytearray | memoryview,
              read_below: "Callable[[int, int], bytes | bytearray] | None" = None) -> None:
        """Guest write into this node (copy-on-write from its backing, read
        with `read_below` when the caller knows a faster way to it)."""
        self._check_range(offset, len(data))
        if len(data):
            self.driver.write(offset, data, read_below or self.read_below)

    def allocation_at(self, offset: int, length: int) -> object | None:
        """A cluster allocation of this node in flight (its data being written
        off the loop) that touches the guest range: a write there must wait
        for it (`wait_for_allocations`)."""
        return self.driver.allocation_at(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero a guest range; whole clusters become zero clusters."""
        self._check_range(offset, length)
        if length:
            self.driver.write_zeroes(offset, length, self.read_below)

    def flush(self) -> None:
        """Make everything written to this node durable."""
        self.driver.flush()

    def write_back(self) -> None:
        """Issue pending metadata writes in crash-safe order, without the final sync."""
        self.driver.write_back()

    def write_back_steps(self) -> Iterator[None]:
        """`write_back` leaving its barriers to the caller: each step yields
        where the file must be made durable before the next writes (guests
        may write to the node meanwhile: what they change waits for the next
        write-back)."""
        return self.driver.write_back_steps()

    def sync_file(self) -> None:
        """The final fdatasync of a flush: touches no in-memory state, so it may
        run in a worker thread while requests go on."""
        if self.writable:
            self.driver.file.flush()  # type: ignore[attr-defined]

    def start_write_out(self) -> None:
        """Start writing the file's dirty pages out (no wait, nothing made
        durable; `BlockFile.start_write_out`), in a worker thread."""
        if self.writable:
            self.driver.file.start_write_out()  # type: ignore[attr-defined]

    def close(self) -> None:
        self.driver.close()
