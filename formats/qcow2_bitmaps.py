"""The qcow2 bitmaps extension and bitmap directory (qcow2 spec "Bitmaps"), read-only.

Bytes in, values out: `find_bitmap_directory` says where the directory lies
(from the parsed header), the caller reads those bytes, and
`bitmap_directory_entries` decodes them. The subset never writes bitmaps and
does not look inside bitmap tables here; `qemu-img check` counts their
clusters itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from construct import Int8ub, Int16ub, Int32ub, Int64ub, Struct

from .errors import CorruptImage
from .qcow2_header import AUTOCLEAR_BITMAPS, EXT_BITMAPS, BitmapsExtension, Qcow2Header

BitmapDirectoryEntry = Struct(
    "bitmap_table_offset" / Int64ub,
    "bitmap_table_size" / Int32ub,
    "flags" / Int32ub,
    "type" / Int8ub,
    "granularity_bits" / Int8ub,
    "name_size" / Int16ub,
    "extra_data_size" / Int32ub,
)
BITMAP_ENTRY_HEADER_SIZE = BitmapDirectoryEntry.sizeof()
assert BITMAP_ENTRY_HEADER_SIZE == 24

BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1


@dataclass(frozen=True)
class BitmapDirectory:
    """Where the bitmap directory lies, from the bitmaps extension."""

    nb_bitmaps: int
    offset: int
    size: int


@dataclass(frozen=True)
class Bitmap:
    """One bitmap directory entry; `name` is UTF-8 with invalid bytes replaced."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    extra_data: bytes

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits


def find_bitmap_directory(filename: str, header: Qcow2Header) -> BitmapDirectory | None:
    """The directory the bitmaps extension points to; None when qemu ignores
    the bitmaps: no extension, or autoclear bit 0 clear (a program without
    bitmap support wrote the image since). Raises `CorruptImage` when the
    extension is too short to hold its fields."""
    ext = header.extension(EXT_BITMAPS)
    if ext is None or not header.autoclear_features & AUTOCLEAR_BITMAPS:
        return None
    if len(ext.data) < BitmapsExtension.sizeof():
        raise CorruptImage(filename, "bitmaps_ext: Invalid extension length")
    fields = BitmapsExtension.parse(ext.data)
    return BitmapDirectory(fields.nb_bitmaps, fields.bitmap_directory_offset,
                           fields.bitmap_directory_size)


def bitmap_directory_entries(filename: str, data: bytes, count: int) -> Iterator[Bitmap]:
    """The first `count` entries of the directory bytes `data`, in order.

    Lazy: an entry whose fixed part runs past the end of `data` raises
    `CorruptImage` when it is reached, after the entries before it were
    yielded. A name or extra data running past the end comes back short."""
    pos = 0
    for index in range(count):
        if pos + BITMAP_ENTRY_HEADER_SIZE > len(data):
            raise CorruptImage(filename, f"bitmap directory entry {index} is truncated")
        head = BitmapDirectoryEntry.parse(data[pos:pos + BITMAP_ENTRY_HEADER_SIZE])
        extra_at = pos + BITMAP_ENTRY_HEADER_SIZE
        name_at = extra_at + head.extra_data_size
        yield Bitmap(
            name=bytes(data[name_at:name_at + head.name_size]).decode("utf-8", "replace"),
            table_offset=head.bitmap_table_offset,
            table_size=head.bitmap_table_size,
            flags=head.flags,
            type=head.type,
            granularity_bits=head.granularity_bits,
            extra_data=bytes(data[extra_at:name_at]),
        )
        pos = -(-(name_at + head.name_size) // 8) * 8
