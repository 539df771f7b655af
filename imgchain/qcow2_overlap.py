"""Metadata overlap checks of a writable qcow2 image (QEMU's qcow2_check_metadata_overlap).

An image whose tables contradict each other (a refcount table at offset 0, an
L2 entry pointing at the L1 table, a refcount block that says a metadata
cluster is free) would otherwise let guest data land on metadata and destroy
the image. `MetadataMap` knows which host clusters hold metadata and what
they hold: the header, the active L1 table, the active L2 tables, the
refcount table and the refcount blocks (a writable image of the subset has
no snapshot table, inactive L1 tables or bitmap directory: those images are
refused for writing). It is built when the image is opened for writing,
refusing up front an image whose structures overlap each other or lie
outside the file, and kept current as the driver allocates tables.

Before any data write and any allocation, the driver asks `check_data` or
`check_free`; a `MetadataOverlap` then fails the write with EIO and the
driver marks the image corrupt, as QEMU does.
"""

from __future__ import annotations

from array import array

from imgchain.formats import CorruptImage
from imgchain.formats.qcow2_header import Qcow2Header
from imgchain.formats.qcow2_tables import REFT_OFFSET_MASK, l1_l2_offset

HEADER = "qcow2_header"
ACTIVE_L1 = "active L1 table"
ACTIVE_L2 = "active L2 table"
REFCOUNT_TABLE = "refcount table"
REFCOUNT_BLOCK = "refcount block"
MAX_HOST_OFFSET = 1 << 56  # an L2 entry cannot address more (bits 9-55)


class MetadataOverlap(CorruptImage):
    """A write would land on metadata, or where a sane image has nothing."""


class MetadataMap:
    """Host cluster -> the metadata structure it holds, and where the image ends."""

    def __init__(self, filename: str, cluster_bits: int, file_size: int) -> None:
        self.filename = filename
        self.bits = cluster_bits
        self.owner: dict[int, str] = {}
        # Invariant: every cluster the image uses lies below `end`
        # (the file's size at open, raised by every allocation).
        self.end = -(-file_size >> cluster_bits) << cluster_bits

    @classmethod
    def of_image(cls, filename: str, header: Qcow2Header, l1: array, reftable: array,
                 file_size: int) -> "MetadataMap":
        """The metadata of an image opened for writing; CorruptImage up front
        when two structures overlap, a table is unaligned or lies outside the file."""
        meta = cls(filename, header.cluster_bits, file_size)
        cs = 1 << header.cluster_bits
        meta.claim(0, cs, HEADER)
        meta.claim(header.l1_table_offset, header.l1_size * 8, ACTIVE_L1)
        meta.claim(header.refcount_table_offset, header.refcount_table_clusters * cs, REFCOUNT_TABLE)
        for i, entry in enumerate(reftable):
            if entry & REFT_OFFSET_MASK:
                meta.claim(entry & REFT_OFFSET_MASK, cs, REFCOUNT_BLOCK, f"refcount table entry {i}")
        for i, entry in enumerate(l1):
            if l1_l2_offset(entry):
                meta.claim(l1_l2_offset(entry), cs, ACTIVE_L2, f"L1 entry {i}")
        return meta

    def _clusters(self, offset: int, length: int) -> range:
        return range(offset >> self.bits, (offset + max(length, 1) - 1 >> self.bits) + 1)

    def claim(self, offset: int, length: int, what: str, where: str = "") -> None:
        """Record a structure found in the image, refusing one that is
        unaligned, outside the file or on top of another."""
        label = f"{what} at {offset:#x}" + (f" ({where})" if where else "")
        if offset & ((1 << self.bits) - 1):
            raise CorruptImage(self.filename, f"{label} is not aligned to a cluster")
        if not length:
            return
        if offset + length > self.end:
            raise CorruptImage(self.filename, f"{label} lies outside the file")
        for cluster in self._clusters(offset, length):
            other = self.owner.get(cluster)
            if other is not None:
                raise CorruptImage(self.filename, f"{label} overlaps with {other}")
            self.owner[cluster] = what

    def add(self, offset: int, length: int, what: str) -> None:
        """Record a structure the driver has just placed (after `check_free`)."""
        for cluster in self._clusters(offset, length):
            self.owner[cluster] = what
        self.end = max(self.end, -(-(offset + length) >> self.bits) << self.bits)

    def remove(self, offset: int, length: int) -> None:
        """Forget a structure the driver has freed (an old refcount table)."""
        for cluster in self._clusters(offset, length):
            self.owner.pop(cluster, None)

    def overlap(self, offset: int, length: int) -> str | None:
        """The first metadata structure in [offset, offset+length), if any."""
        owner = self.owner
        for cluster in self._clusters(offset, length):
            what = owner.get(cluster)
            if what is not None:
                return what
        return None

    def check_free(self, offset: int, length: int) -> None:
        """Clusters the allocator found free: they must hold no metadata and
        lie where an image can have clusters."""
        self._check(offset, length, limit=MAX_HOST_OFFSET)
        self.end = max(self.end, -(-(offset + length) >> self.bits) << self.bits)

    def check_data(self, offset: int, length: int) -> None:
        """A guest write about to land at host `offset` of a cluster the
        image already has: it must hold no metadata and lie inside the image."""
        self._check(offset, length, limit=self.end)

    def _check(self, offset: int, length: int, limit: int) -> None:
        what = self.overlap(offset, length)
        if what is not None:
            raise MetadataOverlap(self.filename, f"Preventing invalid write on metadata "
                                                 f"(overlaps with {what}) at host offset {offset:#x}")
        if offset + length > limit:
            raise MetadataOverlap(self.filename, f"Preventing invalid write at host offset {offset:#x}: "
                                                 f"beyond the end of the image ({limit:#x})")
