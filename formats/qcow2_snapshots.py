"""The qcow2 snapshot table (qcow2 spec "Snapshots"), decoded read-only.

Bytes in, values out: the caller reads the table from `snapshots_offset` and
hands the bytes over. Entries have variable length (extra data, ID and name
follow the 40-byte fixed part, and each entry starts 8-aligned), so the
caller cannot know the table's size up front: `snapshot_table_size` tells it
how many bytes the bytes seen so far call for, and the caller reads until it
has them. The subset never writes snapshots; there is no builder here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from construct import Int16ub, Int32ub, Int64ub, Struct

from .errors import CorruptImage

SnapshotHeader = Struct(
    "l1_table_offset" / Int64ub,
    "l1_size" / Int32ub,
    "id_str_size" / Int16ub,
    "name_size" / Int16ub,
    "date_sec" / Int32ub,
    "date_nsec" / Int32ub,
    "vm_clock_nsec" / Int64ub,
    "vm_state_size" / Int32ub,
    "extra_data_size" / Int32ub,
)
SNAPSHOT_HEADER_SIZE = SnapshotHeader.sizeof()
assert SNAPSHOT_HEADER_SIZE == 40

# The extra data fields qemu 7.2 knows; an entry may carry fewer (or more) bytes.
SnapshotExtra = Struct("vm_state_size_large" / Int64ub, "disk_size" / Int64ub, "icount" / Int64ub)
EXTRA_KNOWN_SIZE = SnapshotExtra.sizeof()
_NO_ICOUNT = (1 << 64) - 1  # what qemu writes when it did not count instructions


@dataclass(frozen=True)
class Snapshot:
    """One snapshot table entry.

    `vm_state_size` is the 64-bit size from the extra data when the entry has
    it, else the 32-bit field. `icount` is None when the entry does not carry
    one (too little extra data, or qemu's -1). `id` and `name` are decoded as
    UTF-8 with invalid bytes replaced."""

    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    icount: int | None
    extra_data: bytes


@dataclass(frozen=True)
class SnapshotTable:
    """The decoded table; `size` runs from its start to the end of the last
    entry's name, without the last entry's padding (as qemu counts it)."""

    snapshots: list[Snapshot]
    size: int


def _head_at(data: bytes, pos: int) -> Any:
    """The parsed fixed part at `pos` (a construct Container)."""
    return SnapshotHeader.parse(data[pos:pos + SNAPSHOT_HEADER_SIZE])


def _entry_size(head: Any) -> int:
    return SNAPSHOT_HEADER_SIZE + head.extra_data_size + head.id_str_size + head.name_size


def snapshot_table_size(data: bytes, count: int) -> int:
    """How many bytes a table of `count` entries spans, as far as `data` (its
    first bytes) shows. At most len(data) once `data` holds the whole table;
    otherwise more than len(data), and the caller should read up to at least
    that size and ask again."""
    pos = 0
    for _ in range(count):
        pos = -(-pos // 8) * 8
        if pos + SNAPSHOT_HEADER_SIZE > len(data):
            return pos + SNAPSHOT_HEADER_SIZE
        pos += _entry_size(_head_at(data, pos))
    return pos


def parse_snapshot_table(filename: str, data: bytes, count: int) -> SnapshotTable:
    """Decode `count` entries from the start of `data` (ref: qcow2_read_snapshots).

    Raises `CorruptImage` naming `filename` when `data` ends inside an entry."""
    snapshots, pos = [], 0
    for index in range(count):
        pos = -(-pos // 8) * 8
        head = _head_at(data, pos) if pos + SNAPSHOT_HEADER_SIZE <= len(data) else None
        end = pos + _entry_size(head) if head is not None else len(data) + 1
        if end > len(data):
            raise CorruptImage(filename, f"snapshot table entry {index} is truncated")
        snapshots.append(_snapshot(head, bytes(data[pos + SNAPSHOT_HEADER_SIZE:end])))
        pos = end
    return SnapshotTable(snapshots, pos)


def _snapshot(h: Any, body: bytes) -> Snapshot:
    """One entry from its parsed fixed part and the bytes after it (extra data, ID, name)."""
    extra = body[:h.extra_data_size]
    ident = body[len(extra):len(extra) + h.id_str_size]
    name = body[len(extra) + len(ident):]
    known = SnapshotExtra.parse(extra[:EXTRA_KNOWN_SIZE].ljust(EXTRA_KNOWN_SIZE, b"\0"))
    return Snapshot(
        id=ident.decode("utf-8", "replace"),
        name=name.decode("utf-8", "replace"),
        l1_table_offset=h.l1_table_offset,
        l1_size=h.l1_size,
        date_sec=h.date_sec,
        date_nsec=h.date_nsec,
        vm_clock_nsec=h.vm_clock_nsec,
        vm_state_size=known.vm_state_size_large if len(extra) >= 8 else h.vm_state_size,
        icount=known.icount if len(extra) >= 24 and known.icount != _NO_ICOUNT else None,
        extra_data=extra,
    )
