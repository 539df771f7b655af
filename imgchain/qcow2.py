"""The qcow2 driver: one opened qcow2 image of the subset.

Maps guest offsets to clusters (block status), writes guest data with
copy-on-write of partial clusters, writes zero clusters, and rewrites the
header's backing name. Reading through the backing chain is the node's job:
the driver says UNALLOCATED and, for copy-on-write, calls the `read_below`
function it is given. Write order follows QCOW2-SUBSET.md §5: refcount
(durable), data, barrier, L2; new L2 table (durable) before the L1 entry;
unlink (durable) before free.

A small write that allocates a cluster may also be done in two halves
(QEMU's QCowL2Meta): `begin_allocation` allocates the host cluster and
registers the guest cluster as in flight, the caller writes the cluster's
data (`L2Meta.copy_now` at once when the old bytes are in memory, else
`L2Meta.copy`, which touches no driver state and may run in a worker
thread), and `end_allocation` enters the L2 entry. While a cluster is in
flight no other write may touch it (the caller waits, QEMU's dependent
requests); the synchronous write path checks that.
"""

from __future__ import annotations

import errno
import os
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

from imgchain.formats import CorruptImage
from imgchain.formats.qcow2_header import (
    AUTOCLEAR_BITMAPS,
    EXT_BITMAPS,
    INCOMPAT_CORRUPT,
    Qcow2Header,
    build_cluster0,
    check_tables,
    check_writable,
    parse_header,
)
from imgchain.formats.qcow2_tables import (
    L2_ZERO_PLAIN,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    ClusterType,
    Geometry,
    classify_l2,
    compressed_extent,
    decode_u64_table,
    encode_u64,
    encode_u64_table,
    inflate_cluster,
    l1_entry,
    l1_l2_offset,
    l2_host_offset,
    l2_normal,
)

from .blockfile import BlockFile, zero_fill
from .preallocate import prealloc_size
from .errors import ImageIOError
from .extent import Extent, Status
from .metacache import MetadataCache
from .qcow2_overlap import ACTIVE_L2, MetadataMap, MetadataOverlap
from .qcow2_pending import PendingMetadata, WriteBack
from .qcow2_refcount import RefcountManager, read_reftable

if TYPE_CHECKING:
    from imgchain.formats.qcow2_snapshots import SnapshotTable

ReadBelow = Callable[[int, int], bytes]
"""Reads guest bytes from the node's backing chain (zeros where there is none)."""

AUTOCLEAR_OFFSET = 88
INCOMPAT_OFFSET = 72
_IN_PLACE_MASK = QCOW_OFLAG_COPIED | QCOW_OFLAG_COMPRESSED | 1  # NORMAL with COPIED, not zero

_STATUS = {
    ClusterType.UNALLOCATED: Status.UNALLOCATED,
    ClusterType.ZERO_PLAIN: Status.ZERO,
    ClusterType.ZERO_ALLOC: Status.ZERO,
    ClusterType.NORMAL: Status.DATA,
    ClusterType.COMPRESSED: Status.COMPRESSED,
}
# Below this host offset, adding one L2 table's worth of clusters cannot carry into the flag bits.
_FAST_HOST_LIMIT = 1 << 55


@dataclass(eq=False)
class L2Meta:
    """One cluster allocation in flight (QEMU's QCowL2Meta): the new host
    cluster of guest cluster `index`, which gets `data` at `start` (an offset
    in the cluster) and the rest from `source`: (fd, host offset) of the
    cluster's current bytes, or None for zeros. `done` is the caller's
    waiter, set when the allocation has ended either way (only an
    allocation that awaits needs one)."""

    index: int
    host: int
    start: int
    data: bytes | bytearray | memoryview
    source: tuple[int, int] | None
    done: object = None

    def copy_now(self, file: BlockFile, cluster: bytearray) -> bool:
        """The data half at once, if the old bytes are in memory
        (`old_bytes_now`): built in `cluster` (a buffer of the cluster's
        size, used again) and written in one write. False, with nothing
        written, when they are not: then `copy`, in a worker thread, so that
        the loop never waits for the disk."""
        if not old_bytes_now(cluster, self.source):
            return False
        cluster[self.start:self.start + len(self.data)] = self.data
        file.pwrite(self.host, cluster)
        return True

    def copy(self, file: BlockFile, cluster_size: int) -> None:
        """The data half the slow way, however long the disk takes to give
        the old bytes. Touches no driver state, so a worker thread may run
        it; an OSError leaves nothing pointing at the cluster."""
        cluster = bytearray(cluster_size)
        if self.source is not None:
            fd, at = self.source
            view = memoryview(cluster)
            while view and (done := os.preadv(fd, [view], at)):  # past the file's end: zeros
                view, at = view[done:], at + done
        cluster[self.start:self.start + len(self.data)] = self.data
        file.pwrite(self.host, cluster)


def old_bytes_now(cluster: bytearray, source: tuple[int, int] | None) -> bool:
    """Fill `cluster` with a cluster's old bytes if they are in memory: zeros
    for no source, else one read from (fd, host offset) that the page cache
    answers or that fails (RWF_NOWAIT: never a wait for the disk). False,
    the buffer's content undefined, when they are not (partly cached, the
    file ends there, a file system without NOWAIT)."""
    if source is None:
        zero_fill(memoryview(cluster))
        return True
    fd, at = source
    try:
        return os.preadv(fd, [cluster], at, os.RWF_NOWAIT) == len(cluster)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without NOWAIT
            raise
        return False


def read_header(file: BlockFile, filename: str) -> Qcow2Header:
    """Read and parse cluster 0 of an open qcow2 file."""
    head = file.pread(0, min(4096, file.size()))  # a short file must look short
    bits = int.from_bytes(head[20:24], "big") if len(head) >= 24 else 0
    if 12 < bits <= 21 and len(head) == 4096:
        head += file.pread(4096, (1 << bits) - 4096)
    return parse_header(filename, head)


def read_snapshot_table(file: BlockFile, header: Qcow2Header, filename: str) -> SnapshotTable:
    """Read and parse the internal snapshot table of an open qcow2 file.

    The table's length shows only entry by entry, so this reads what
    `snapshot_table_size` asks for, at least doubling what it has each time."""
    from imgchain.formats.qcow2_snapshots import parse_snapshot_table, snapshot_table_size  # only images with snapshots
    data, count = b"", header.nb_snapshots
    while (need := snapshot_table_size(data, count)) > len(data):
        more = file.pread(header.snapshots_offset + len(data), max(need, 2 * len(data)) - len(data))
        if not more:
            break  # a short file: the parser names the entry it ends in
        data += more
    return parse_snapshot_table(filename, data, count)


class Qcow2Driver:
    """One qcow2 image: header, L1 in memory, L2 tables through a cache."""

    format_name = "qcow2"

    def __init__(self, file: BlockFile, filename: str) -> None:
        self.file = file
        self.filename = filename
        self.header = read_header(file, filename)
        check_tables(filename, self.header, file.size())
        self.geo = Geometry(self.header.cluster_bits, self.header.refcount_order)
        self.l1: array = decode_u64_table(
            file.pread(self.header.l1_table_offset, self.header.l1_size * 8))
        # Decoded L2 tables, in the process's bounded pool (imgchain.metacache).
        self.l2_cache: MetadataCache[array] = MetadataCache(self.geo.cluster_size)
        self.refcounts: RefcountManager | None = None
        self.pending = PendingMetadata()
        self._writing_back: Iterator[None] | None = None  # a write-back stopped at a barrier
        # write-backs taken so far, and finished (in the order taken)
        self._taken = self._finished = 0
        self.ordered = True  # issue barriers between dependent writes
        # Where metadata lives; None when read-only. Set when the image is
        # found corrupt while writing: then every further write fails.
        self.meta: MetadataMap | None = None
        self.corruption: str | None = None
        # Invariant: guest cluster index -> its allocation whose data is being
        # written (begin_allocation .. end_allocation); its L2 entry is not
        # entered yet, and no other write touches the cluster meanwhile.
        self.cluster_allocs: dict[int, L2Meta] = {}
        if file.writable:
            check_writable(filename, self.header)
            reftable = read_reftable(file, self.header)
            self.meta = MetadataMap.of_image(filename, self.header, self.l1, reftable, file.size())
            self._clear_autoclear()
            self.refcounts = RefcountManager(file, self.header, self.barrier, reftable, self.meta)
            if prealloc_size():
                file.preallocate(prealloc_size())  # the file grows at its end as clusters are added

    # -- properties -------------------------------------------------------

    @property
    def size(self) -> int:
        return self.header.size

    @property
    def cluster_size(self) -> int:
        return self.geo.cluster_size

    @property
    def backing_file(self) -> str | None:
        return self.header.backing_file

    @property
    def backing_format(self) -> str | None:
        return self.header.backing_format

    def barrier(self) -> None:
        """Make everything issued so far durable before what follows."""
        if self.ordered:
            self.file.flush()

    def _clear_autoclear(self) -> None:
        # A writer must clear autoclear bits it does not honour (§1.3); the
        # bitmaps bit without its extension is harmless to clear.
        keep = AUTOCLEAR_BITMAPS if self.header.extension(EXT_BITMAPS) else 0
        bits = self.header.autoclear_features & keep
        if bits != self.header.autoclear_features:
            self.file.pwrite(AUTOCLEAR_OFFSET, encode_u64(bits))
            self.file.flush()
            self.header.autoclear_features = bits

    # -- tables -----------------------------------------------------------

    def _load_l2(self, offset: int) -> array:
        return decode_u64_table(self.file.pread(offset, self.geo.cluster_size))

    def _l2_offset(self, l1_index: int) -> int:
        """Host offset of the L2 table of one L1 index, 0 if none (checked)."""
        if not 0 <= l1_index < len(self.l1):
            raise CorruptImage(self.filename, f"guest offset beyond the L1 table (index {l1_index})")
        offset = l1_l2_offset(self.l1[l1_index])
        if offset % self.geo.cluster_size:
            raise CorruptImage(self.filename,
                               f"L2 table offset {offset:#x} unaligned (L1 index: {l1_index:#x})")
        return offset

    def l2_table(self, l1_index: int) -> tuple[int, array | None]:
        """(host offset, entries) of the L2 table for one L1 index, (0, None) if none."""
        offset = self._l2_offset(l1_index)
        if not offset:
            return 0, None
        dirty = self.pending.table(offset)
        return offset, dirty if dirty is not None else self.l2_cache.get(offset, self._load_l2)

    def _l2_slice(self, l1_index: int, index: int, count: int) -> array | None:
        """Entries index..index+count-1 of the L2 table of one L1 index (None
        if there is no table): from the table in memory when it is there
        (dirty, or in the pool), else read from the file alone, without
        loading the whole table into the pool. Block status needs a few
        entries of a table at a time (a miss of the backend's maps, 64 of
        8192), and a chain deeper than the pool holds would otherwise load
        and decode a whole table of every layer for each (QEMU's answer is
        l2-cache-entry-size). A table not in memory is clean: the file has it."""
        offset = self._l2_offset(l1_index)
        if not offset:
            return None
        table = self.pending.table(offset)
        if table is None:
            table = self.l2_cache.peek(offset)
        if table is not None:
            return table[index:index + count]
        return decode_u64_table(self.file.pread(offset + 8 * index, 8 * count))

    def l2_entry(self, guest_offset: int) -> int:
        _, table = self.l2_table(self.geo.l1_index(guest_offset))
        return table[self.geo.l2_index(guest_offset)] if table is not None else 0

    # -- block status -----------------------------------------------------

    def block_status(self, offset: int, length: int, want_zero: bool = True) -> list[Extent]:
        """Merged extents covering [offset, offset+length) of this layer only.

        Adjacent clusters merge when their status is the same (not
        COMPRESSED) and their host offsets continue (or neither has one).
        Raises `CorruptImage` at the first unaligned L2 table or data cluster."""
        bits = self.geo.cluster_bits
        if length and offset >> bits == (offset + length - 1) >> bits:  # one cluster: the hot path
            return [self._cluster_status(offset, length)]
        out: list[Extent] = []
        end = offset + length
        span = self.geo.l2_span
        pos = offset
        while pos < end:
            stop = min(end, (pos // span + 1) * span)
            entries = self._l2_slice(self.geo.l1_index(pos), self.geo.l2_index(pos),
                                     ((stop - 1) >> bits) - (pos >> bits) + 1)
            if entries is None:  # a whole L2 range unallocated: one step
                _append_extent(out, Extent(pos, stop - pos, Status.UNALLOCATED))
            else:
                self._slice_status(out, entries, pos, stop)
            pos = stop
        return out

    def _slice_status(self, out: list[Extent], entries: array, start: int, stop: int) -> None:
        """Append the extents of [start, stop), a range inside one L2 table
        whose entries from `start`'s on are `entries`.

        One pass over the entries, making an Extent only where a run breaks.
        `next_entry` is the entry that would continue the run with the same
        flag bits (the next host cluster, or the same host-less entry), so
        most entries cost one comparison; any other entry is classified."""
        bits = self.geo.cluster_bits
        cs = 1 << bits
        first = start >> bits
        run_start, run_status, run_host = start, None, 0
        next_entry = step = -1
        for i, entry in enumerate(entries):
            if entry == next_entry:  # the run goes on, flag bits and all
                next_entry += step
                continue
            host = entry & L2E_OFFSET_MASK
            status = _STATUS[classify_l2(entry)]
            expect = run_host + ((first + i - (run_start >> bits)) << bits) if run_host else 0
            if status is not run_status or host != expect or status is Status.COMPRESSED:
                at = max((first + i) << bits, start)
                if run_status is not None:
                    _append_extent(out, _run_extent(run_start, at, run_status, run_host, cs))
                if status is Status.COMPRESSED:
                    host = compressed_extent(entry, bits).host_offset
                elif host % cs:
                    raise CorruptImage(self.filename, f"Cluster allocation offset {host:#x} unaligned "
                                                      f"(guest offset {at:#x})")
                run_start, run_status, run_host = at, status, host
            step = cs if host else 0
            fast = status is not Status.COMPRESSED and host < _FAST_HOST_LIMIT
            next_entry = entry + step if fast else -1
        if run_status is not None:
            _append_extent(out, _run_extent(run_start, stop, run_status, run_host, cs))

    def _cluster_status(self, offset: int, length: int) -> Extent:
        entries = self._l2_slice(self.geo.l1_index(offset), self.geo.l2_index(offset), 1)
        entry = entries[0] if entries is not None else 0
        kind = classify_l2(entry)
        if kind is ClusterType.COMPRESSED:
            return Extent(offset, length, Status.COMPRESSED, compressed_extent(entry, self.geo.cluster_bits).host_offset)
        host = entry & L2E_OFFSET_MASK
        if not host:
            return Extent(offset, length, _STATUS[kind])
        if host % self.geo.cluster_size:
            raise CorruptImage(self.filename, f"Cluster allocation offset {host:#x} unaligned "
                                              f"(guest offset {offset & ~(self.geo.cluster_size - 1):#x})")
        return Extent(offset, length, _STATUS[kind], host + (offset & (self.geo.cluster_size - 1)))

    def read_compressed(self, guest_offset: int) -> bytes:
        """The whole inflated guest cluster that holds guest_offset."""
        entry = self.l2_entry(guest_offset)
        ext = compressed_extent(entry, self.geo.cluster_bits)
        try:
            return inflate_cluster(self.file.pread(ext.host_offset, ext.length), self.cluster_size)
        except ValueError as exc:
            raise CorruptImage(self.filename, f"guest offset {guest_offset:#x}: {exc}") from None

    # -- writes -----------------------------------------------------------

    def _require_writable(self) -> RefcountManager:
        if self.refcounts is None:
            raise ImageIOError(f"{self.filename}: image is opened read-only", 30)  # EROFS
        if self.corruption is not None:
            raise ImageIOError(f"{self.filename}: image is corrupt, no further writes: "
                               f"{self.corruption}", 5)  # EIO
        return self.refcounts

    def _mark_corrupt(self, exc: MetadataOverlap) -> ImageIOError:
        """QEMU's qcow2_signal_corruption: set the corrupt bit (no read-write
        open until `check -r all`), refuse every further write, and return
        the EIO error that fails this one."""
        if self.corruption is None:
            self.corruption = exc.reason
            self.header.incompatible_features |= INCOMPAT_CORRUPT
            self.file.pwrite(INCOMPAT_OFFSET, encode_u64(self.header.incompatible_features))
            self.file.flush()
        return ImageIOError(f"{exc}; image marked corrupt", 5)  # EIO

    def _l2_for_write(self, l1_index: int) -> tuple[int, array]:
        offset, table = self.l2_table(l1_index)
        if table is not None:
            if not self.l1[l1_index] & QCOW_OFLAG_COPIED:
                raise CorruptImage(self.filename, f"L2 table at {offset:#x} is shared (no COPIED flag)")
            return offset, table
        refcounts = self._require_writable()
        offset = refcounts.allocate(1)
        assert self.meta is not None
        self.meta.add(offset, self.geo.cluster_size, ACTIVE_L2)
        table = array("Q", bytes(self.geo.cluster_size))
        self.l2_cache.put(offset, table)
        self.pending.mark_l2(offset, table, 0, len(table) - 1)  # a new table is written whole
        self.l1[l1_index] = l1_entry(offset)
        self.pending.l1.add(l1_index)
        return offset, table

    def write(self, offset: int, data: bytes | bytearray | memoryview, read_below: ReadBelow) -> None:
        """Write guest data; partial clusters are completed from below (COW).
        A write that would land on metadata fails with EIO and marks the
        image corrupt (qcow2_overlap)."""
        try:
            self._write(offset, data, read_below)
        except MetadataOverlap as exc:
            raise self._mark_corrupt(exc) from None

    def _write(self, offset: int, data: bytes | bytearray | memoryview, read_below: ReadBelow) -> None:
        self._require_writable()
        cs = self.geo.cluster_size
        if data and offset // cs == (offset + len(data) - 1) // cs:  # hot path: in place
            host = self.in_place_host(offset)
            if host is not None:
                self.file.pwrite(host, data)
                return
        view = memoryview(data)
        span = self.geo.l2_span
        pos = 0
        while pos < len(view):
            off = offset + pos
            n = min(len(view) - pos, span - off % span)
            self._write_slice(off, view[pos:pos + n], read_below)
            pos += n

    def _write_slice(self, offset: int, data: memoryview, read_below: ReadBelow) -> None:
        cs = self.geo.cluster_size
        refcounts = self._require_writable()
        l2_offset, table = self._l2_for_write(self.geo.l1_index(offset))
        meta = self.meta
        assert meta is not None
        first, last = offset // cs, (offset + len(data) - 1) // cs
        self._check_no_allocation(first, last)
        base = self.geo.l2_index(offset) - first
        fresh = [c for c in range(first, last + 1) if not self._needs_no_allocation(table[base + c])]
        next_host = refcounts.allocate(len(fresh)) if fresh else 0
        writes: list[tuple[int, bytes | memoryview]] = []
        updates: dict[int, int] = {}
        dropped: list[int] = []
        for c in range(first, last + 1):
            entry = table[base + c]
            lo, hi = max(offset, c * cs), min(offset + len(data), (c + 1) * cs)
            piece = data[lo - offset:hi - offset]
            kind = classify_l2(entry)
            if kind is ClusterType.NORMAL and entry & QCOW_OFLAG_COPIED:
                meta.check_data(l2_host_offset(entry), cs)
                writes.append((l2_host_offset(entry) + lo - c * cs, piece))
                continue
            if kind is ClusterType.ZERO_ALLOC and entry & QCOW_OFLAG_COPIED:
                host = l2_host_offset(entry)
                meta.check_data(host, cs)
            else:
                host, next_host = next_host, next_host + cs
            writes.append((host + lo - c * cs, piece))
            if hi - lo < cs:  # copy-on-write: keep what the write does not cover
                head, tail = self._cow_parts(c * cs, lo, hi, entry, kind, read_below)
                writes.append((host, head))
                writes.append((host + hi - c * cs, tail))
            updates[base + c] = l2_normal(host)
            if kind not in (ClusterType.UNALLOCATED, ClusterType.ZERO_PLAIN) and l2_host_offset(host) != l2_host_offset(entry):
                dropped.append(entry)
        _pwrite_merged(self.file, writes)
        if updates:
            self._update_l2(l2_offset, table, updates)
        self.pending.unlinked.extend(dropped)

    def _check_no_allocation(self, first: int, last: int) -> None:
        """A write must wait for the allocations in flight that it touches
        (the caller's job: BlockBackend, the block jobs); this catches one
        that did not, before it could allocate the cluster a second time."""
        if self.cluster_allocs:
            busy = [i for i in self.cluster_allocs if first <= i <= last]
            assert not busy, f"{self.filename}: write to cluster {busy[0]} while its allocation is in flight"

    def allocation_at(self, offset: int, length: int) -> L2Meta | None:
        """An allocation in flight that touches the guest range, if any."""
        if not self.cluster_allocs:
            return None
        bits = self.geo.cluster_bits
        first, last = offset >> bits, (offset + max(length, 1) - 1) >> bits
        if last - first < len(self.cluster_allocs):
            return next((self.cluster_allocs[i] for i in range(first, last + 1) if i in self.cluster_allocs), None)
        return next((m for i, m in self.cluster_allocs.items() if first <= i <= last), None)

    def begin_allocation(self, offset: int, data: bytes | bytearray | memoryview,
                         source: tuple[int, int] | None) -> L2Meta | None:
        """The first half of a partial write into one cluster that this image
        does not hold (unallocated or a plain zero cluster): allocate its host
        cluster and register it in flight. `source` is where the cluster's
        current bytes are (None: zeros, which a zero cluster always is).
        None when the write is not such a write (the caller writes it with
        `write`)."""
        cs = self.geo.cluster_size
        index = offset >> self.geo.cluster_bits
        if (self.refcounts is None or self.corruption is not None or not 0 < len(data) < cs
                or (offset + len(data) - 1) >> self.geo.cluster_bits != index):
            return None
        kind = classify_l2(self.l2_entry(offset))
        if kind is ClusterType.ZERO_PLAIN:
            source = None
        elif kind is not ClusterType.UNALLOCATED:
            return None
        self._check_no_allocation(index, index)
        try:
            self._l2_for_write(self.geo.l1_index(offset))
            host = self.refcounts.allocate(1)
        except MetadataOverlap as exc:
            raise self._mark_corrupt(exc) from None
        meta = L2Meta(index, host, offset - index * cs, data, source)
        self.cluster_allocs[index] = meta
        return meta

    def copy_on_write_now(self, offset: int, data: bytes | bytearray | memoryview, cluster: bytearray) -> int | None:
        """A partial write into one cluster that this image does not hold
        (unallocated, in a table that exists), whose old bytes the caller
        has put in `cluster` (a buffer of the cluster's size): its host
        cluster allocated, written and entered at once, with no allocation
        in flight, so no waiter; returns the new host offset. None, with
        nothing changed, when the write needs more (a table to allocate, a
        zero cluster, an allocation in flight there): `begin_allocation`."""
        bits = self.geo.cluster_bits
        index = offset >> bits
        l1_index = self.geo.l1_index(offset)
        if (self.refcounts is None or self.corruption is not None or not 0 < len(data) < len(cluster)
                or (offset + len(data) - 1) >> bits != index or index in self.cluster_allocs
                or not 0 <= l1_index < len(self.l1) or not self.l1[l1_index] & QCOW_OFLAG_COPIED):
            return None
        l2_offset, table = self.l2_table(l1_index)
        i = self.geo.l2_index(offset)
        if table is None or classify_l2(table[i]) is not ClusterType.UNALLOCATED:
            return None
        try:
            host = self.refcounts.allocate(1)
        except MetadataOverlap as exc:
            raise self._mark_corrupt(exc) from None
        start = offset - (index << bits)
        cluster[start:start + len(data)] = data
        try:
            self.file.pwrite(host, cluster)
        except BaseException:
            self.refcounts.give_back(host)
            raise
        self._update_l2(l2_offset, table, {i: l2_normal(host)})
        return host

    def end_allocation(self, meta: L2Meta) -> None:
        """The second half, once the data is written: enter the L2 entry
        (written back after a barrier, like any other) and end the flight."""
        del self.cluster_allocs[meta.index]
        offset = meta.index << self.geo.cluster_bits
        l2_offset, table = self._l2_for_write(self.geo.l1_index(offset))  # the table as it is now
        i = self.geo.l2_index(offset)
        assert classify_l2(table[i]) in (ClusterType.UNALLOCATED, ClusterType.ZERO_PLAIN), \
            f"{self.filename}: cluster {meta.index} changed during its allocation"
        self._update_l2(l2_offset, table, {i: l2_normal(meta.host)})

    def abort_allocation(self, meta: L2Meta) -> None:
        """The data write failed: nothing points at the new cluster; it goes
        back to the allocator (QEMU's qcow2_alloc_cluster_abort)."""
        del self.cluster_allocs[meta.index]
        assert self.refcounts is not None
        self.refcounts.give_back(meta.host)

    def in_place_host(self, offset: int) -> int | None:
        """Host offset where a write at guest `offset` lands with no allocation
        or copy (an allocated cluster of this image with COPIED), else None."""
        meta = self.meta
        if meta is None or self.corruption is not None:
            return None
        entry = self.l2_entry(offset)
        host = entry & L2E_OFFSET_MASK
        if entry & _IN_PLACE_MASK != QCOW_OFLAG_COPIED or not host:
            return None
        if host >> meta.bits in meta.owner or host >= meta.end:
            return None  # the slow path refuses it (qcow2_overlap)
        return host + offset % self.geo.cluster_size

    @staticmethod
    def _needs_no_allocation(entry: int) -> bool:
        """An allocated cluster of this image (data or zeroed) with COPIED."""
        kind = classify_l2(entry)
        return kind in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC) and bool(entry & QCOW_OFLAG_COPIED)

    def _cow_parts(self, guest: int, lo: int, hi: int, entry: int, kind: ClusterType,
                   read_below: ReadBelow) -> tuple[bytes | memoryview, bytes | memoryview]:
        """The old content of cluster `guest` before `lo` and from `hi` on: the
        parts of a new cluster that a partial write [lo, hi) leaves to copy."""
        end = guest + self.geo.cluster_size
        if kind is ClusterType.UNALLOCATED:
            if guest < lo and hi < end:  # both: one read of the cluster below, not two walks
                whole = memoryview(read_below(guest, end - guest))
                return whole[:lo - guest], whole[hi - guest:]
            head = read_below(guest, lo - guest) if lo > guest else b""
            return head, read_below(hi, end - hi) if hi < end else b""
        if kind is ClusterType.COMPRESSED:
            whole = memoryview(self.read_compressed(guest))
        elif kind is ClusterType.NORMAL:  # shared cluster without COPIED
            whole = memoryview(self.file.pread(l2_host_offset(entry), end - guest))
        else:
            return bytes(lo - guest), bytes(end - hi)
        return whole[:lo - guest], whole[hi - guest:]

    def _update_l2(self, l2_offset: int, table: array, updates: dict[int, int]) -> None:
        """Change entries in memory; the file gets them at the next flush."""
        for i, e in updates.items():
            table[i] = e
        self.pending.mark_l2(l2_offset, table, min(updates), max(updates))
        # The pool may have let this table go (and loaded a copy) while the
        # write read from below: the one it keeps must be the one changed.
        self.l2_cache.put(l2_offset, table)
        if len(self.pending.l2) > self.l2_cache.dirty_limit():
            self.write_back()  # dirty tables stay in memory: their bytes are bounded too

    def write_back(self) -> None:
        """Write pending metadata in crash-safe order (qcow2_pending); the
        caller's flush of the file then makes it durable."""
        for _ in self.write_back_steps():
            self.file.flush()

    def write_back_steps(self) -> Iterator[None]:
        """`write_back` as steps: it yields wherever a barrier is due, and the
        caller makes the file durable (an fdatasync in a worker thread, say)
        before resuming it; guests may write meanwhile. A step resumed
        without a sync that started after its yield syncs the file itself,
        so the order holds whoever resumes it. Write-backs of one image run
        one after the other: one started while another waits at a barrier
        first finishes that one (its older tables must not land last). It
        ends only once the write-back that took what was pending at its start
        has finished, whoever took it (another caller may, while this one
        waits at a barrier of an older one)."""
        goal = self._taken + bool(self.pending)
        while self._finished < goal:
            if self._writing_back is None:
                self._writing_back = self._write_back(self.pending.take(self.l1))
                self._taken += 1
            yield from self._resume(self._writing_back)

    def _resume(self, steps: Iterator[None]) -> Iterator[None]:
        # A loop, not `yield from`: a caller that gives up (cancelled at a
        # barrier) must not close `steps`; the next write-back finishes them.
        for _ in steps:
            yield
        if self._writing_back is steps:
            self._writing_back = None
            self._finished += 1

    def _write_back(self, work: WriteBack) -> Iterator[None]:
        # A step that fails (EIO) leaves what is not written yet pending
        # again, as QEMU's cache keeps a table dirty whose write failed.
        try:
            yield from self._barrier_due()  # data and COW before the L2 entries that point to them
            for at, entries in work.l2:
                self.file.pwrite(at, entries)
        except BaseException:
            self.pending.give_back(work, tables=True)
            raise
        finally:
            self.pending.landed(work)
        try:
            if work.l1:
                yield from self._barrier_due()  # new L2 tables before the L1 entries that point to them
                for i, entry in work.l1:
                    self.file.pwrite(self.header.l1_table_offset + 8 * i, encode_u64(entry))
            if work.unlinked:
                yield from self._barrier_due()  # unlink before free
        except BaseException:
            self.pending.give_back(work, tables=False)
            raise
        if work.unlinked:
            self._drop_clusters(work.unlinked)

    def _barrier_due(self) -> Iterator[None]:
        if self.ordered:
            mark = self.file.sync_mark()
            yield
            if not self.file.durable_since(mark):
                self.file.flush()

    def _drop_clusters(self, entries: list[int]) -> None:
        """Free the host clusters of unlinked entries (after the unlink is durable)."""
        refcounts = self._require_writable()
        cs = self.geo.cluster_size
        clusters: list[int] = []
        for entry in entries:
            if classify_l2(entry) is ClusterType.COMPRESSED:
                ext = compressed_extent(entry, self.geo.cluster_bits)
                clusters.extend(range(ext.host_offset // cs, (ext.host_offset + ext.length - 1) // cs + 1))
            else:
                clusters.append(l2_host_offset(entry) // cs)
        refcounts.free_clusters(clusters)

    def write_zeroes(self, offset: int, length: int, read_below: ReadBelow) -> None:
        """Zero a range: whole clusters become zero clusters (hiding the
        backing), partial ones are written with zeros."""
        try:
            self._write_zeroes(offset, length, read_below)
        except MetadataOverlap as exc:
            raise self._mark_corrupt(exc) from None

    def _write_zeroes(self, offset: int, length: int, read_below: ReadBelow) -> None:
        self._require_writable()
        cs = self.geo.cluster_size
        end = offset + length
        first = -(-offset // cs) * cs
        last = end if end == self.size else end // cs * cs
        if first >= last:
            self._write(offset, bytes(length), read_below)
            return
        if offset < first:
            self._write(offset, bytes(first - offset), read_below)
        pos = first
        while pos < last:
            n = min(last - pos, self.geo.l2_span - pos % self.geo.l2_span)
            self._zero_slice(pos, n)
            pos += n
        if last < end:
            self._write(last, bytes(end - last), read_below)

    def _zero_slice(self, offset: int, length: int) -> None:
        cs = self.geo.cluster_size
        self._check_no_allocation(offset // cs, (offset + length - 1) // cs)
        l2_offset, table = self._l2_for_write(self.geo.l1_index(offset))
        updates: dict[int, int] = {}
        dropped: list[int] = []
        for c in range(offset // cs, -(-(offset + length) // cs)):
            i = self.geo.l2_index(c * cs)
            entry = table[i]
            if entry == L2_ZERO_PLAIN:
                continue
            updates[i] = L2_ZERO_PLAIN
            if classify_l2(entry) is not ClusterType.ZERO_PLAIN and entry != 0:
                dropped.append(entry)
        if updates:
            self._update_l2(l2_offset, table, updates)
        self.pending.unlinked.extend(dropped)

    def flush(self) -> None:
        """Everything written so far becomes durable (metadata written back first)."""
        if self.file.writable:
            self.write_back()
            self.file.flush()

    def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        """Rewrite cluster 0 with a new backing name and format (rebase -u).

        The whole cluster is built first, so a name that does not fit fails
        with nothing written."""
        self._require_writable()
        new = self.header.replace(backing_file=name or None, backing_format=fmt if name else None)
        cluster0 = build_cluster0(self.filename, new)
        self.file.pwrite(0, cluster0)
        self.file.flush()
        self.header.backing_file = new.backing_file
        self.header.backing_format = new.backing_format

    def close(self) -> None:
        """Flush, give back unused reserved clusters, and close the file."""
        try:
            if self.refcounts is not None and self.file.fd >= 0:
                self.flush()
                self.refcounts.release_reserve()
                self.file.flush()
        finally:
            self.file.close()
            self.l2_cache.close()
            if self.refcounts is not None:
                self.refcounts.blocks.close()


def _run_extent(start: int, end: int, status: Status, host: int, cluster_size: int) -> Extent:
    """The Extent of a run whose first cluster is at `host` (0: none; the
    deflate stream's offset for a compressed cluster, kept as it is)."""
    if status is Status.COMPRESSED:
        return Extent(start, end - start, status, host)
    return Extent(start, end - start, status, host + start % cluster_size if host else None)


def _append_extent(out: list[Extent], ext: Extent) -> None:
    """Append, merging with the previous extent when status and host offsets continue."""
    if out:
        prev = out[-1]
        same = prev.status is ext.status and prev.status is not Status.COMPRESSED
        if same and _host_continues(prev, ext):
            out[-1] = Extent(prev.guest_offset, prev.length + ext.length, prev.status, prev.host_offset)
            return
    out.append(ext)


def _host_continues(prev: Extent, ext: Extent) -> bool:
    if prev.host_offset is None or ext.host_offset is None:
        return prev.host_offset is None and ext.host_offset is None
    return prev.host_offset + prev.length == ext.host_offset


def _pwrite_merged(file: BlockFile, writes: list[tuple[int, bytes | memoryview]]) -> None:
    """Issue writes sorted by host offset, joining adjacent ones into one call."""
    writes.sort(key=lambda w: w[0])
    writes = [w for w in writes if len(w[1])]
    i = 0
    while i < len(writes):
        start, parts = writes[i][0], [writes[i][1]]
        end = start + len(writes[i][1])
        i += 1
        while i < len(writes) and writes[i][0] == end:
            parts.append(writes[i][1])
            end += len(writes[i][1])
            i += 1
        if len(parts) == 1:
            file.pwrite(start, parts[0])
        else:
            file.pwritev(start, parts)
