"""Metadata changes of a qcow2 image made in memory and written back at flush (QEMU's
writeback L2 cache).

Guest writes change L2 entries (and, for a new L2 table, an L1 entry) in
memory at once; the file gets them at the next flush, in the order that keeps
the image consistent after a crash at any point (QCOW2-SUBSET.md §5, §9):
data durable, then L2 tables, durable, then L1 entries, durable, and only then
the refcount decreases of clusters the new entries no longer reference. A kill
before a flush loses only what the guest had not flushed, and leaks at worst.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field


@dataclass
class DirtyTable:
    """An L2 table with entries lo..hi (inclusive) not yet written."""

    table: array
    lo: int
    hi: int


@dataclass
class PendingMetadata:
    # Invariant: every table here is also the one the driver reads from.
    l2: dict[int, DirtyTable] = field(default_factory=dict)
    l1: set[int] = field(default_factory=set)
    # L2 entries whose host clusters lose a reference once the new entries are durable.
    unlinked: list[int] = field(default_factory=list)

    def mark_l2(self, offset: int, table: array, lo: int, hi: int) -> None:
        dirty = self.l2.get(offset)
        if dirty is None:
            self.l2[offset] = DirtyTable(table, lo, hi)
        else:
            dirty.lo, dirty.hi = min(dirty.lo, lo), max(dirty.hi, hi)

    def table(self, offset: int) -> array | None:
        dirty = self.l2.get(offset)
        return dirty.table if dirty is not None else None

    def __bool__(self) -> bool:
        return bool(self.l2 or self.l1 or self.unlinked)

    def take(self) -> "PendingMetadata":
        """Hand over everything pending and start empty."""
        taken = PendingMetadata(self.l2, self.l1, self.unlinked)
        self.l2, self.l1, self.unlinked = {}, set(), []
        return taken
