"""qcow2 tables: bulk codecs, entry classification and geometry.

L1, L2 and refcount tables are big-endian arrays of up to hundreds of
thousands of entries, so they are decoded in bulk with `array` and a byteswap
rather than entry by entry. Entries are classified with pure mask functions
(ref: qcow2_get_cluster_type). No file access here.
"""

from __future__ import annotations

import enum
import sys
import zlib
from array import array
from dataclasses import dataclass
from functools import cached_property

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1

_SWAP = sys.byteorder == "little"


class ClusterType(enum.Enum):
    """What an L2 entry says about one guest cluster."""

    UNALLOCATED = "unallocated"
    ZERO_PLAIN = "zero-plain"
    ZERO_ALLOC = "zero-alloc"
    NORMAL = "normal"
    COMPRESSED = "compressed"


# ---------------------------------------------------------------------------
# Bulk codecs


def decode_u64_table(data: bytes) -> array:
    """Big-endian u64 entries -> array('Q')."""
    table = array("Q")
    table.frombytes(data[: len(data) // 8 * 8])
    if _SWAP:
        table.byteswap()
    return table


def encode_u64_table(table: array) -> bytes:
    """array('Q') -> big-endian bytes."""
    if not _SWAP:
        return table.tobytes()
    copy = array("Q", table)
    copy.byteswap()
    return copy.tobytes()


def encode_u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


_NONZERO_BYTE = bytes([0]) + bytes([1]) * 255  # translate table: any byte but 0 -> 1
_SPANS = (8192, 1024, 128)  # the sizes a table is tested for zeros in, coarse to fine
_ZERO_SPANS = {span: bytes(span) for span in _SPANS}


def nonzero_entries(data: bytes) -> list[tuple[int, int]]:
    """(index, value) of each big-endian u64 entry of `data` that is not 0.

    Tables of a sparse image are mostly zeros, so the zeros are skipped in C
    instead of looking at every entry in Python: spans of 8 KiB, then 1 KiB,
    then 128 bytes are compared with zeros (a memcmp each), and only a span
    that is not all zero is looked into."""
    found: list[tuple[int, int]] = []
    _find_nonzero(data, 0, len(data) // 8 * 8, 0, found)
    return found


def _find_nonzero(data: bytes, lo: int, hi: int, level: int, found: list[tuple[int, int]]) -> None:
    if level == len(_SPANS):  # a small span: mark its non-zero bytes, then find the entries marked
        marks = data[lo:hi].translate(_NONZERO_BYTE)
        pos = marks.find(1)
        while pos >= 0:
            at = lo + pos // 8 * 8
            found.append((at // 8, int.from_bytes(data[at:at + 8], "big")))
            pos = marks.find(1, at + 8 - lo)
        return
    span, zeros = _SPANS[level], _ZERO_SPANS[_SPANS[level]]
    for start in range(lo, hi, span):
        if not data.startswith(zeros, start):  # also when less than a span is left: look closer
            _find_nonzero(data, start, min(start + span, hi), level + 1, found)


def decode_refcount_block(data: bytes, order: int) -> list[int] | array:
    """Decode one refcount block of any width 2**order bits (0..6)."""
    bits = 1 << order
    if bits == 16:
        block = array("H")
        block.frombytes(data)
        if _SWAP:
            block.byteswap()
        return block
    if bits >= 8:
        width = bits // 8
        return [int.from_bytes(data[i:i + width], "big") for i in range(0, len(data), width)]
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    return [(data[i // per_byte] >> (bits * (i % per_byte))) & mask
            for i in range(len(data) * per_byte)]


def encode_refcount16(block: array) -> bytes:
    """array('H') refcount block -> big-endian bytes."""
    if not _SWAP:
        return block.tobytes()
    copy = array("H", block)
    copy.byteswap()
    return copy.tobytes()


# ---------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class Geometry:
    """Index maths for one cluster size and refcount width."""

    cluster_bits: int
    refcount_order: int = 4

    @cached_property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @cached_property
    def l2_entries(self) -> int:
        return self.cluster_size // 8

    @cached_property
    def l2_span(self) -> int:
        """Guest bytes covered by one L2 table."""
        return self.cluster_size * self.l2_entries

    @cached_property
    def refblock_entries(self) -> int:
        return self.cluster_size * 8 >> self.refcount_order

    def l1_index(self, guest_offset: int) -> int:
        return guest_offset >> self.cluster_bits >> (self.cluster_bits - 3)

    def l2_index(self, guest_offset: int) -> int:
        return (guest_offset >> self.cluster_bits) & (self.l2_entries - 1)

    def l1_size_for(self, virtual_size: int) -> int:
        return -(-virtual_size // self.l2_span)

    def reftable_index(self, host_cluster: int) -> int:
        return host_cluster // self.refblock_entries

    def refblock_index(self, host_cluster: int) -> int:
        return host_cluster % self.refblock_entries

    def clusters(self, nbytes: int) -> int:
        """Clusters needed to hold nbytes."""
        return -(-nbytes // self.cluster_size)


# ---------------------------------------------------------------------------
# Entries


def classify_l2(entry: int) -> ClusterType:
    """ref: qcow2_get_cluster_type (standard, non-extended L2)."""
    if entry & QCOW_OFLAG_COMPRESSED:
        return ClusterType.COMPRESSED
    if entry & QCOW_OFLAG_ZERO:
        return ClusterType.ZERO_ALLOC if entry & L2E_OFFSET_MASK else ClusterType.ZERO_PLAIN
    if entry & L2E_OFFSET_MASK:
        return ClusterType.NORMAL
    return ClusterType.UNALLOCATED


def l2_host_offset(entry: int) -> int:
    return entry & L2E_OFFSET_MASK


def l1_l2_offset(entry: int) -> int:
    return entry & L1E_OFFSET_MASK


def l1_entry(l2_offset: int) -> int:
    return l2_offset | QCOW_OFLAG_COPIED


def l2_normal(host_offset: int) -> int:
    return host_offset | QCOW_OFLAG_COPIED


L2_ZERO_PLAIN = QCOW_OFLAG_ZERO
L2_UNALLOCATED = 0


@dataclass(frozen=True)
class CompressedExtent:
    """Where a compressed cluster's deflate stream lies in the host file."""

    host_offset: int
    length: int


def compressed_extent(entry: int, cluster_bits: int) -> CompressedExtent:
    """Decode a compressed L2 descriptor (QCOW2-SUBSET.md §2.3)."""
    x = 62 - (cluster_bits - 8)
    coffset = entry & ((1 << x) - 1)
    nsect = ((entry >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return CompressedExtent(coffset, nsect * 512 - (coffset & 511))


def inflate_cluster(data: bytes, cluster_size: int) -> bytes:
    """Raw-deflate decode of one compressed cluster; ValueError if it is bad."""
    try:
        out = zlib.decompressobj(-12).decompress(data, cluster_size)
    except zlib.error as exc:
        raise ValueError(f"bad compressed cluster: {exc}") from None
    if len(out) != cluster_size:
        raise ValueError(f"compressed cluster inflates to {len(out)} bytes, not {cluster_size}")
    return out
