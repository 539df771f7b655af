"""Comparing the guest-visible content of two chains (qemu-img compare, 7.2).

Ranges that block status shows as zeros in both chains are skipped without
reading; everything else is read in chunks and compared, and a difference is
reported at its first differing sector. Chains of different sizes compare
equal (after qemu-img's warning) when the longer one's tail reads as zeros.

Strict mode (`-s`) also wants equal sizes and, at every offset, the same
block status as qemu-img sees it (ref: img_compare, which compares the whole
status word of bdrv_block_status_above): allocated, data, zero, offset
valid, and EOF, the flag of the one extent that reaches the end of the
image. So a range stored as zero clusters differs from the same zeros left
unallocated, and a qcow2 image from its raw copy. Content is compared up to
the first status difference, so whichever mismatch comes first is the one
reported, as qemu-img's single pass reports it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .chain import close_chain, open_backing_chain
from .extent import Status
from .map import NO_OFFSET, chain_runs
from .node import Node

CHUNK = 1 << 20
SECTOR = 512

BlockStatus = tuple[bool, bool, bool, bool, bool]
"""QEMU's status flags: (allocated, zero, data, offset valid, EOF)."""


@dataclass(frozen=True)
class CompareResult:
    identical: bool
    message: str
    offset: int | None = None


def compare_images(path1: str, path2: str, strict: bool = False,
                   trust_backing: bool = False) -> CompareResult:
    """Compare the chains of two images by content (and status, if strict)."""
    n1 = open_backing_chain(path1, trust_backing=trust_backing)
    try:
        n2 = open_backing_chain(path2, trust_backing=trust_backing)
        try:
            return compare_nodes(n1, n2, strict)
        finally:
            close_chain(n2)
    finally:
        close_chain(n1)


def compare_nodes(n1: Node, n2: Node, strict: bool = False) -> CompareResult:
    """Compare two opened chains; the result's message is what qemu-img prints."""
    if strict and n1.size != n2.size:
        return CompareResult(False, "Strict mode: Image size mismatch!")
    common = min(n1.size, n2.size)
    status_at = first_status_mismatch(n1, n2) if strict else None
    result = _compare_range(n1, n2, 0, common if status_at is None else status_at)
    if result is not None:
        return result
    if status_at is not None:
        return CompareResult(False, f"Strict mode: Offset {status_at} block status mismatch!", status_at)
    if n1.size == n2.size:
        return CompareResult(True, "Images are identical.")
    warning = "Warning: Image size mismatch!\n"
    longer = n1 if n1.size > n2.size else n2
    tail = _tail_difference(longer, common)
    if tail is None:
        return CompareResult(True, warning + "Images are identical.")
    return CompareResult(False, warning + f"Content mismatch at offset {tail}!", tail)


# ---------------------------------------------------------------------------
# Content


def _first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int:
    """Index of the first differing byte, rounded down to a sector as qemu reports it."""
    for i in range(0, len(a), SECTOR):
        if a[i:i + SECTOR] != b[i:i + SECTOR]:
            return i
    raise AssertionError("buffers are equal")


def _compare_range(n1: Node, n2: Node, start: int, end: int) -> CompareResult | None:
    for pos in range(start, end, CHUNK):
        n = min(CHUNK, end - pos)
        if n1.reads_as_zero(pos, n) and n2.reads_as_zero(pos, n):
            continue
        d1, d2 = n1.read(pos, n), n2.read(pos, n)
        if d1 != d2:
            at = pos + _first_difference(d1, d2)
            return CompareResult(False, f"Content mismatch at offset {at}!", at)
    return None


def _tail_difference(longer: Node, start: int) -> int | None:
    """The first non-zero sector of `longer` from `start` on, if any."""
    for pos in range(start, longer.size, CHUNK):
        n = min(CHUNK, longer.size - pos)
        if longer.reads_as_zero(pos, n):
            continue
        data = longer.read(pos, n)
        if data.count(0) != n:
            return pos + _first_difference(data, bytes(n))
    return None


# ---------------------------------------------------------------------------
# Block status, as qemu-img compare sees it


def first_status_mismatch(n1: Node, n2: Node) -> int | None:
    """The first offset where the two chains' block status differs, if any
    (the chains have the same size)."""
    a, b = _status_runs(n1), _status_runs(n2)
    i = j = pos = 0
    while pos < n1.size:
        while a[i][1] <= pos:
            i += 1
        while b[j][1] <= pos:
            j += 1
        if a[i][2] != b[j][2]:
            return pos
        pos = min(a[i][1], b[j][1])
    return None


def _status_runs(top: Node) -> list[tuple[int, int, BlockStatus]]:
    """(start, end, status) of the chain's ranges, from its map runs: a range
    no layer stores is unallocated, except past the end of a backing file,
    where QEMU's block layer answers zeros as allocated by that layer. EOF
    marks the extent that ends the image and, leaking from below, one that
    ends the bottom layer unallocated."""
    chain = top.chain()
    bottom = len(chain) - 1
    eof = [(last_extent_start(top, top.size)[0], top.size)]
    if chain[-1].size < top.size:
        start, unallocated = last_extent_start(top, chain[-1].size)
        if unallocated:
            eof.append((start, chain[-1].size))
    runs: list[tuple[int, int, BlockStatus]] = []
    for start, end, depth, present, zero, data, offset in chain_runs(top):
        flags = (present or depth < bottom, zero, data, offset != NO_OFFSET)
        for lo, hi in sorted(eof):
            if start < lo < end:
                runs.append((start, lo, (*flags, False)))
                start = lo
            if start < hi < end:
                runs.append((start, hi, (*flags, True)))
                start = hi
        runs.append((start, end, (*flags, any(lo <= start < hi for lo, hi in eof))))
    return runs


def last_extent_start(top: Node, end: int) -> tuple[int, bool]:
    """Where the block-status extent of the chain that holds byte end-1 and
    ends at `end` starts, and whether it is unallocated down to the bottom.

    Each layer down to the one that answers the byte cuts the extent at its
    own extent's start (a qcow2 extent never crosses an L2 table: qcow2
    answers one table at a time), and a backing that ends before the byte
    cuts it at its end, from where QEMU answers zeros."""
    start = 0
    node: Node | None = top
    while node is not None and end:
        if end > node.size:  # the byte is past this backing's end
            return max(start, node.size), False
        geo = getattr(node.driver, "geo", None)
        lo = max(start, (end - 1) // geo.l2_span * geo.l2_span) if geo else start
        ext = node.driver.block_status(lo, end - lo)[-1]
        start = max(start, ext.guest_offset)
        if ext.status is not Status.UNALLOCATED:
            return start, False
        node = node.backing_node
    return start, True
