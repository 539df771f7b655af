"""Metadata changes of a qcow2 image made in memory and written back at flush (QEMU's
writeback L2 cache).

Guest writes change L2 entries (and, for a new L2 table, an L1 entry) in
memory at once; the file gets them at the next flush, in the order that keeps
the image consistent after a crash at any point (QCOW2-SUBSET.md §5, §9):
data durable, then L2 tables, durable, then L1 entries, durable, and only then
the refcount decreases of clusters the new entries no longer reference. A kill
before a flush loses only what the guest had not flushed, and leaks at worst.

A write-back may run in steps with guests writing between them (its barriers
in a worker thread): `take` then copies what it hands over (`WriteBack`: the
dirty entries' bytes and the L1 entries as they are at that moment), so an
entry a guest changes after it waits for the next write-back, whose barrier
comes after that entry's data. Until a table handed over is written, lookups
still find it (`in_flight`): the cache may have let it go, and the file does
not have it yet.
"""

from __future__ import annotations

from array import array

from imgchain.formats.qcow2_tables import encode_u64_table

# Plain classes with __slots__, not dataclasses: every qcow2 open loads this module, and a
# dataclass definition costs as much start-up as a hundred lines of code.


class DirtyTable:
    """An L2 table with entries lo..hi (inclusive) not yet written."""

    __slots__ = ("table", "lo", "hi")

    def __init__(self, table: array, lo: int, hi: int) -> None:
        self.table, self.lo, self.hi = table, lo, hi


class WriteBack:
    """What one write-back writes, fixed when it was taken."""

    __slots__ = ("l2", "l1", "unlinked", "tables")

    def __init__(self, l2: list[tuple[int, bytes]], l1: list[tuple[int, int]], unlinked: list[int],
                 tables: list[int]) -> None:
        self.l2 = l2  # (file offset, the entries' bytes), in file order
        self.l1 = l1  # (L1 index, entry)
        self.unlinked = unlinked  # L2 entries whose clusters are freed once the new entries are durable
        self.tables = tables  # the L2 tables' offsets (in flight until written)


class PendingMetadata:
    """Metadata changed in memory and not yet written to the image (a qcow2 node's dirty cache).

    Every table here (and in `in_flight`) is also the one the driver reads from.
    """

    __slots__ = ("l2", "l1", "unlinked", "in_flight")

    def __init__(self) -> None:
        self.l2: dict[int, DirtyTable] = {}
        self.l1: set[int] = set()
        # L2 entries whose host clusters lose a reference once the new entries are durable.
        self.unlinked: list[int] = []
        # Tables the write-back in progress took and has not written yet (offset -> table; write-backs
        # of one image run one after the other, and one's tables land before the next takes any).
        self.in_flight: dict[int, array] = {}

    def mark_l2(self, offset: int, table: array, lo: int, hi: int) -> None:
        dirty = self.l2.get(offset)
        if dirty is None:
            self.l2[offset] = DirtyTable(table, lo, hi)
        else:
            dirty.lo, dirty.hi = min(dirty.lo, lo), max(dirty.hi, hi)

    def table(self, offset: int) -> array | None:
        dirty = self.l2.get(offset)
        if dirty is not None:
            return dirty.table
        return self.in_flight.get(offset)

    def __bool__(self) -> bool:
        return bool(self.l2 or self.l1 or self.unlinked)

    def take(self, l1: array) -> WriteBack:
        """Hand over everything pending, as it is now, and start empty."""
        work = WriteBack(
            [(offset + 8 * d.lo, encode_u64_table(d.table[d.lo:d.hi + 1])) for offset, d in sorted(self.l2.items())],
            [(i, l1[i]) for i in sorted(self.l1)], self.unlinked, sorted(self.l2))
        self.in_flight.update((offset, dirty.table) for offset, dirty in self.l2.items())
        self.l2, self.l1, self.unlinked = {}, set(), []
        return work

    def give_back(self, work: WriteBack, tables: bool) -> None:
        """A write-back failed: what it took and has not written is pending
        again (its `tables` too, if their write had not completed; the L1
        entries as they are now, which point at the same tables or newer)."""
        if tables:
            for offset in work.tables:
                table = self.in_flight[offset]
                self.mark_l2(offset, table, 0, len(table) - 1)
        self.l1.update(i for i, _ in work.l1)
        self.unlinked.extend(work.unlinked)

    def landed(self, work: WriteBack) -> None:
        """`work`'s tables are in the file (the cache may drop them now)."""
        for offset in work.tables:
            del self.in_flight[offset]
