"""qcow2 refcounts and cluster allocation for a writable image.

Keeps refcounts exact (every live cluster has refcount 1 in the subset),
allocates first-fit so freed clusters are reused, makes refcount blocks
describe themselves, and grows the refcount table the way QEMU does
(ref: alloc_refcount_block, qcow2_refcount_area). Ordering follows
QCOW2-SUBSET.md §5: a refcount increase is durable before anything points to
the cluster (`barrier`), and a decrease comes only after the unlink.
"""

from __future__ import annotations

from array import array
from typing import Callable, Iterable

from imgchain.formats.qcow2_header import Qcow2Header
from imgchain.formats.qcow2_tables import (
    REFT_OFFSET_MASK,
    Geometry,
    decode_refcount_block,
    decode_u64_table,
    encode_refcount16,
    encode_u64,
    encode_u64_table,
)

from .blockfile import BlockFile
from .metacache import MetadataCache
from .qcow2_overlap import REFCOUNT_BLOCK, REFCOUNT_TABLE, MetadataMap

REFTABLE_FIELDS_OFFSET = 48  # {refcount_table_offset u64, refcount_table_clusters u32}


def read_reftable(file: BlockFile, header: Qcow2Header) -> array:
    """The refcount table of an open image, as on disk."""
    return decode_u64_table(file.pread(header.refcount_table_offset,
                                       header.refcount_table_clusters << header.cluster_bits))


class RefcountManager:
    """Refcount table, refcount blocks and the free-cluster allocator of one image.

    Every run the allocator hands out, and every refcount block and table it
    places, is first checked against `meta` (qcow2_overlap): refcounts that
    call a metadata cluster free raise MetadataOverlap instead."""

    def __init__(self, file: BlockFile, header: Qcow2Header, barrier: Callable[[], None],
                 reftable: array, meta: MetadataMap) -> None:
        self.file = file
        self.header = header
        self.geo = Geometry(header.cluster_bits, header.refcount_order)
        self.barrier = barrier
        self.meta = meta
        # Invariant: reftable mirrors the on-disk table entry for entry.
        self.reftable = reftable
        self.blocks: MetadataCache[array | list[int]] = MetadataCache(self.geo.cluster_size)  # 16-bit: one byte per byte
        # Invariant: no cluster below free_hint has refcount 0.
        self.free_hint = 0
        # Invariant: reserve holds runs [start, count] with a durable refcount of 1
        # that nothing references yet; allocate() hands them out first.
        self.reserve: list[list[int]] = []
        self.batch = max(1, min(256, (4 << 20) >> header.cluster_bits))

    # -- reading ----------------------------------------------------------

    def _load_block(self, offset: int) -> array | list[int]:
        data = self.file.pread(offset, self.geo.cluster_size)
        block = decode_refcount_block(data, self.header.refcount_order)
        return block if isinstance(block, array) else list(block)

    def block_offset(self, cluster: int) -> int:
        idx = self.geo.reftable_index(cluster)
        if idx >= len(self.reftable):
            return 0
        return self.reftable[idx] & REFT_OFFSET_MASK

    def get(self, cluster: int) -> int:
        """The on-disk refcount of host cluster `cluster`."""
        block = self.block_offset(cluster)
        if not block:
            return 0
        return self.blocks.get(block, self._load_block)[self.geo.refblock_index(cluster)]

    # -- writing ----------------------------------------------------------

    def set(self, cluster: int, value: int) -> None:
        """Write one refcount."""
        self.set_range(cluster, 1, value)

    def set_range(self, first: int, count: int, value: int) -> None:
        """Write the same refcount for `count` clusters, one write per block."""
        rbe = self.geo.refblock_entries
        c = first
        while c < first + count:
            rt_idx = self.geo.reftable_index(c)
            if rt_idx >= len(self.reftable):
                raise AssertionError("refcount table does not cover the cluster")
            if not self.reftable[rt_idx] & REFT_OFFSET_MASK:
                self._alloc_block(rt_idx)
            block_off = self.reftable[rt_idx] & REFT_OFFSET_MASK
            block = self.blocks.get(block_off, self._load_block)
            lo = self.geo.refblock_index(c)
            hi = min(rbe, lo + first + count - c)
            for i in range(lo, hi):
                block[i] = value
            self.file.pwrite(block_off + 2 * lo, value.to_bytes(2, "big") * (hi - lo))
            c += hi - lo
        if value == 0:
            self.free_hint = min(self.free_hint, first)

    def _alloc_block(self, rt_idx: int) -> None:
        # ref: alloc_refcount_block. The new block's own cluster is counted in
        # itself when it falls in its own range, else through the block that
        # covers it; if that block is missing too, make it first and search
        # again (qemu's -EAGAIN).
        rbe = self.geo.refblock_entries
        first = rt_idx * rbe
        while True:
            cluster = self._find_free(1)
            if first <= cluster < first + rbe:
                break
            other = self.geo.reftable_index(cluster)
            if self.reftable[other] & REFT_OFFSET_MASK:
                self.set(cluster, 1)
                break
            self._alloc_block(other)
        block = array("H", bytes(self.geo.cluster_size))
        if first <= cluster < first + rbe:
            block[cluster - first] = 1
        offset = cluster * self.geo.cluster_size
        self.meta.check_free(offset, self.geo.cluster_size)
        self.meta.add(offset, self.geo.cluster_size, REFCOUNT_BLOCK)
        self.file.pwrite(offset, encode_refcount16(block))
        self.barrier()
        self.blocks.put(offset, block)
        self.reftable[rt_idx] = offset
        self.file.pwrite(self.header.refcount_table_offset + 8 * rt_idx, encode_u64(offset))
        self.barrier()

    # -- allocation -------------------------------------------------------

    def allocate(self, count: int) -> int:
        """Hand out `count` contiguous clusters whose refcount of 1 is already
        issued; it is durable before anything on disk points at them, because
        every write-back of L2/L1 entries starts with a barrier. Returns the
        host offset of the first. Refcounts are raised for a batch at a time
        (§9), so a crash can only leak the unused rest of the batch."""
        for run in self.reserve:
            if run[1] >= count:
                start = run[0]
                run[0] += count
                run[1] -= count
                if not run[1]:
                    self.reserve.remove(run)
                return start * self.geo.cluster_size
        start, size = self._reserve(count)
        if size > count:
            self.reserve.append([start + count, size - count])
        return start * self.geo.cluster_size

    def _reserve(self, count: int) -> tuple[int, int]:
        """First-fit run of `count` free clusters, extended with the free
        clusters right after it up to a batch; refcounts raised, durable."""
        while True:
            start = self._find_free(count)
            missing = self._first_missing_block(start, count)
            if missing is None:
                break
            self._alloc_block(missing)  # it may take a cluster of the run: search again
        limit = min(start + max(count, self.batch),
                    (self.geo.reftable_index(start + count - 1) + 1) * self.geo.refblock_entries)
        end = start + count
        while end < limit and self._is_free(end) and end not in self.meta.owner:
            end += 1
        self.meta.check_free(start << self.geo.cluster_bits, (end - start) << self.geo.cluster_bits)
        # No barrier here: nothing on disk points at these clusters before the
        # next write-back, and that starts with a barrier (qcow2_pending).
        self.set_range(start, end - start, 1)
        if start == self.free_hint:
            self.free_hint = end
        return start, end - start

    def give_back(self, host_offset: int) -> None:
        """An allocated cluster that nothing came to reference (a failed
        write): it joins the reserve, its refcount of 1 as it is, and is
        handed out first next time."""
        self.reserve.insert(0, [host_offset >> self.geo.cluster_bits, 1])

    def release_reserve(self) -> None:
        """Give back reserved clusters nothing uses (at close)."""
        for start, count in self.reserve:
            self.set_range(start, count, 0)
        self.reserve = []

    def _first_missing_block(self, start: int, count: int) -> int | None:
        for idx in range(self.geo.reftable_index(start), self.geo.reftable_index(start + count - 1) + 1):
            if not self.reftable[idx] & REFT_OFFSET_MASK:
                return idx
        return None

    def free(self, host_offset: int, count: int = 1) -> None:
        """Drop one reference from each cluster (the unlink must be durable)."""
        first = host_offset >> self.geo.cluster_bits
        self.free_clusters(range(first, first + count))

    def free_clusters(self, clusters: Iterable[int]) -> None:
        """Drop one reference from each host cluster listed (twice if listed
        twice), with one write per refcount block touched: emptying an image
        frees thousands of clusters. A refcount already 0 stays 0."""
        by_block: dict[int, list[int]] = {}
        for cluster in clusters:
            block_off = self.block_offset(cluster)
            if block_off:
                by_block.setdefault(block_off, []).append(cluster)
        for block_off, members in by_block.items():
            block = self.blocks.get(block_off, self._load_block)  # changed and written before the next get
            changed = []
            for cluster in members:
                i = self.geo.refblock_index(cluster)
                if block[i]:
                    block[i] -= 1
                    changed.append(i)
                    if not block[i]:
                        self.free_hint = min(self.free_hint, cluster)
            if changed:
                lo, hi = min(changed), max(changed)
                self.file.pwrite(block_off + 2 * lo, encode_refcount16(array("H", block[lo:hi + 1])))

    def _find_free(self, count: int) -> int:
        """First run of `count` clusters with refcount 0 that the table covers."""
        while True:
            start = self._scan(self.free_hint, count)
            last = start + count - 1
            if self.geo.reftable_index(last) < len(self.reftable):
                return start
            self._grow_table(self.geo.reftable_index(last) + 1)

    def _scan(self, start: int, count: int) -> int:
        advancing = start == self.free_hint
        run_start = c = start
        while c - run_start < count:
            if not self._is_free(c):
                run_start = c + 1
                if advancing and c == self.free_hint:
                    self.free_hint = c + 1
            c += 1
        return run_start

    def _is_free(self, cluster: int) -> bool:
        block = self.block_offset(cluster)
        if not block:
            return True
        return self.blocks.get(block, self._load_block)[self.geo.refblock_index(cluster)] == 0

    # -- table growth -----------------------------------------------------

    def _grow_table(self, min_entries: int) -> None:
        # ref: qcow2_refcount_area. New blocks and the new table go to the
        # first cluster no existing block can describe; the blocks describe
        # themselves and the table. Then: blocks, table, 12-byte header
        # switch, each durable, and only then free the old table.
        cs, rbe = self.geo.cluster_size, self.geo.refblock_entries
        old_entries = len(self.reftable)
        meta = old_entries * rbe
        table_clusters = self.header.refcount_table_clusters
        nblocks = 1
        while True:
            while table_clusters * (cs // 8) < max(min_entries, old_entries + nblocks) + 1:
                table_clusters = (table_clusters * 3 + 1) // 2
            if nblocks * rbe >= nblocks + table_clusters:
                break
            nblocks += 1
        self.meta.check_free(meta * cs, (nblocks + table_clusters) * cs)
        new_table = array("Q", self.reftable)
        new_table.extend([0] * (table_clusters * (cs // 8) - old_entries))
        for j in range(nblocks):
            block = array("H", bytes(cs))
            lo = (old_entries + j) * rbe
            for c in range(meta, meta + nblocks + table_clusters):
                if lo <= c < lo + rbe:
                    block[c - lo] = 1
            offset = (meta + j) * cs
            self.meta.add(offset, cs, REFCOUNT_BLOCK)
            self.file.pwrite(offset, encode_refcount16(block))
            self.blocks.put(offset, block)
            new_table[old_entries + j] = offset
        self.barrier()
        table_offset = (meta + nblocks) * cs
        self.meta.add(table_offset, table_clusters * cs, REFCOUNT_TABLE)
        self.file.pwrite(table_offset, encode_u64_table(new_table))
        self.barrier()
        fields = encode_u64(table_offset) + table_clusters.to_bytes(4, "big")
        self.file.pwrite(REFTABLE_FIELDS_OFFSET, fields)
        self.barrier()
        old_offset, old_clusters = self.header.refcount_table_offset, self.header.refcount_table_clusters
        self.header.refcount_table_offset = table_offset
        self.header.refcount_table_clusters = table_clusters
        self.reftable = new_table
        self.meta.remove(old_offset, old_clusters * cs)
        self.free(old_offset, old_clusters)
