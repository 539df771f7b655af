"""formats.qcow2_snapshots and formats.qcow2_bitmaps on byte strings.

The images qemu makes are covered by test_info_map and test_check (both
compare with qemu-img); here are the edges those cannot reach: extra data of
every length, entry padding, truncation, the directory read lazily.
"""

from __future__ import annotations

import struct

import pytest

from imgchain.formats import CorruptImage
from imgchain.formats.qcow2_bitmaps import bitmap_directory_entries, find_bitmap_directory
from imgchain.formats.qcow2_header import AUTOCLEAR_BITMAPS, EXT_BITMAPS, Extension, Qcow2Header
from imgchain.formats.qcow2_snapshots import parse_snapshot_table, snapshot_table_size


def snapshot_entry(ident: bytes, name: bytes, extra: bytes, l1: int = 0x50000) -> bytes:
    head = struct.pack(">QIHHIIQII", l1, 2, len(ident), len(name), 1700000000, 5, 3_723_456_000_000,
                       7, len(extra))
    return head + extra + ident + name


def padded(entry: bytes) -> bytes:
    return entry + bytes(-len(entry) % 8)


@pytest.mark.parametrize("extra, vm_state, icount", [
    (b"", 7, None),  # no extra data: the 32-bit VM state size
    ((1 << 33).to_bytes(8, "big"), 1 << 33, None),
    ((1 << 33).to_bytes(8, "big") + bytes(8) + (42).to_bytes(8, "big"), 1 << 33, 42),
    (bytes(16) + b"\xff" * 8 + b"future", 0, None),  # icount -1: none recorded
])
def test_snapshot_extra_data(extra: bytes, vm_state: int, icount: int | None) -> None:
    table = parse_snapshot_table("x.qcow2", snapshot_entry(b"1", b"first", extra), 1)
    [sn] = table.snapshots
    assert (sn.id, sn.name, sn.l1_table_offset, sn.l1_size) == ("1", "first", 0x50000, 2)
    assert (sn.vm_state_size, sn.icount, sn.extra_data) == (vm_state, icount, extra)
    assert (sn.date_sec, sn.date_nsec, sn.vm_clock_nsec) == (1700000000, 5, 3_723_456_000_000)


def test_snapshot_entries_are_8_aligned_and_the_size_ends_at_the_last_name() -> None:
    first, second = snapshot_entry(b"1", b"a", bytes(16)), snapshot_entry(b"22", b"b\xff", bytes(24))
    data = padded(first) + second
    assert len(first) % 8 and len(second) % 8
    table = parse_snapshot_table("x.qcow2", data + bytes(5), 2)
    assert [(s.id, s.name) for s in table.snapshots] == [("1", "a"), ("22", "b\ufffd")]
    assert table.size == len(data)


def test_snapshot_table_size_asks_for_more_until_it_has_all() -> None:
    first, second = snapshot_entry(b"1", b"a", bytes(16)), snapshot_entry(b"2", b"b", bytes(16))
    data = padded(first) + second
    assert snapshot_table_size(b"", 0) == 0
    assert snapshot_table_size(b"", 2) == 40
    assert snapshot_table_size(data[:40], 2) == len(padded(first)) + 40
    assert snapshot_table_size(data[:len(padded(first)) + 40], 2) == len(data)
    assert snapshot_table_size(data, 2) == len(data)


def test_truncated_snapshot_table() -> None:
    data = padded(snapshot_entry(b"1", b"a", bytes(16))) + snapshot_entry(b"2", b"b", bytes(16))
    with pytest.raises(CorruptImage, match=r"^x.qcow2: snapshot table entry 1 is truncated$"):
        parse_snapshot_table("x.qcow2", data[:-1], 2)
    with pytest.raises(CorruptImage, match="entry 0 is truncated"):
        parse_snapshot_table("x.qcow2", data[:39], 2)


def bitmap_entry(name: bytes, flags: int = 2, granularity_bits: int = 16, extra: bytes = b"") -> bytes:
    entry = struct.pack(">QIIBBHI", 0x90000, 1, flags, 1, granularity_bits, len(name), len(extra))
    return padded(entry + extra + name)


def header_with_bitmaps(payload: bytes, autoclear: int = AUTOCLEAR_BITMAPS) -> Qcow2Header:
    return Qcow2Header(cluster_bits=16, size=1 << 20, l1_size=1, l1_table_offset=0x30000,
                       refcount_table_offset=0x10000, refcount_table_clusters=1,
                       autoclear_features=autoclear, extensions=[Extension(EXT_BITMAPS, payload)])


def test_bitmap_directory() -> None:
    data = bitmap_entry(b"bm0") + bitmap_entry(b"second", flags=3, granularity_bits=9, extra=b"xyz")
    bitmaps = list(bitmap_directory_entries("x.qcow2", data, 2))
    assert [(b.name, b.flags, b.granularity, b.extra_data) for b in bitmaps] == [
        ("bm0", 2, 65536, b""), ("second", 3, 512, b"xyz")]
    assert (bitmaps[0].table_offset, bitmaps[0].table_size, bitmaps[0].type) == (0x90000, 1, 1)


def test_bitmap_directory_is_read_lazily() -> None:
    entries = bitmap_directory_entries("x.qcow2", bitmap_entry(b"bm0") + bytes(23), 2)
    assert next(entries).name == "bm0"
    with pytest.raises(CorruptImage, match=r"^x.qcow2: bitmap directory entry 1 is truncated$"):
        next(entries)


def test_find_bitmap_directory() -> None:
    payload = struct.pack(">IIQQ", 2, 0, 0x48, 0x80000)
    where = find_bitmap_directory("x.qcow2", header_with_bitmaps(payload))
    assert where is not None and (where.nb_bitmaps, where.offset, where.size) == (2, 0x80000, 0x48)
    assert find_bitmap_directory("x.qcow2", header_with_bitmaps(payload, autoclear=0)) is None
    with pytest.raises(CorruptImage, match="bitmaps_ext: Invalid extension length"):
        find_bitmap_directory("x.qcow2", header_with_bitmaps(payload[:20]))
