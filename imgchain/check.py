"""`qemu-img check` for the qcow2 subset: refcount consistency, and repair.

Reimplements the behaviour of QEMU 7.2's `qcow2_check_refcounts` and its
helpers (ref: calculate_refcounts, check_refcounts_l1/l2, check_refblocks,
compare_refcounts, rebuild_refcount_structure, check_oflag_copied,
qcow2_check_bitmaps_refcounts) and of qemu-img's report
(collect_image_check, dump_human_image_check): every reference to every host
cluster is counted in an in-memory table, which is then compared with the
on-disk refcounts. Counters, stderr lines and exit codes are QEMU's.

What it must not do: write anything unless a repair is asked for; write
refcounts other than 16 bits wide (widths of order 0..6 are all read).
Errors opening the image or its backing chain propagate as
`ImgchainError`/`FormatError`; the CLI maps them to exit code 1, as qemu-img.
"""

from __future__ import annotations

import dataclasses
import itertools
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from imgchain.formats import CorruptImage, ReadOnlyImage
from imgchain.formats.qcow2_header import (
    AUTOCLEAR_BITMAPS, EXT_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, Qcow2Header, build_cluster0)
from imgchain.formats.qcow2_tables import (
    L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK, QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO, REFT_OFFSET_MASK, REFT_RESERVED_MASK, ClusterType, classify_l2,
    compressed_extent, decode_refcount_block, decode_u64_table, encode_refcount16, encode_u64,
    encode_u64_table, nonzero_entries)

from .blockfile import BlockFile
from .chain import close_chain, open_backing_chain
from .locks import ACTIVE_WRITER
from .qcow2 import read_header, read_snapshot_table

if TYPE_CHECKING:
    from imgchain.formats.qcow2_bitmaps import BitmapDirectory

FIX_LEAKS, FIX_ERRORS = 1, 2  # BDRV_FIX_LEAKS, BDRV_FIX_ERRORS
REPAIR_MODES = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}
EXIT_NOT_SUPPORTED = 63
EIO = "Input/output error"
BME_OFFSET_MASK, BME_RESERVED_MASK, BME_ALL_ONES = 0x00FFFFFFFFFFFE00, 0xFF000000000001FE, 1
MAX_L1_ENTRIES = 32 * 1024 * 1024 // 8
KEPT_L2_ENTRIES = 1 << 18  # at most this many set entries of active L2 tables kept between the passes
INCOMPAT_OFFSET, REFTABLE_FIELDS_OFFSET = 72, 48
_JSON_KEYS = ("filename", "format", "check-errors", "image-end-offset", "corruptions", "leaks",
              "corruptions-fixed", "leaks-fixed", "total-clusters", "allocated-clusters",
              "fragmented-clusters", "compressed-clusters")  # QAPI ImageCheck field order
_ALWAYS = ("filename", "format", "check-errors")
_STALE_BITMAPS = ["warning: a program lacking bitmap support modified this file, so all bitmaps are "
                  "now considered inconsistent",
                  "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix."]


@dataclass
class CheckResult:
    """What `qemu-img check` reports for one image (its BdrvCheckResult and ImageCheck).

    `messages` are the lines qemu-img writes to stderr, without its "qemu-img: "
    prefix. `aborted`: qemu-img prints no report at all (the check itself failed
    or the format has none), so `human()` is empty and no JSON should be printed."""

    filename: str
    format: str
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)
    aborted: bool = False

    def exit_code(self) -> int:
        """qemu-img's: 63 format without checks, 1 check failed, 2 corruptions, 3 leaks, 0 clean."""
        if self.format != "qcow2":
            return EXIT_NOT_SUPPORTED
        if self.aborted or self.check_errors:
            return 1
        return 2 if self.corruptions else 3 if self.leaks else 0

    def to_json(self) -> dict[str, object]:
        """The keys and values of `qemu-img check --output=json`, in the order qemu prints them."""
        values = {k: getattr(self, k.replace("-", "_")) for k in _JSON_KEYS}
        keys = sorted((k for k in _JSON_KEYS if k in _ALWAYS or values[k]),
                      key=lambda k: (_qdict_bucket(k), -_JSON_KEYS.index(k)))
        return {k: values[k] for k in keys}

    def human(self) -> str:
        """qemu-img's human-readable stdout, repair summary included."""
        if self.aborted or self.format != "qcow2":
            return ""
        out = ""
        if self.corruptions_fixed or self.leaks_fixed:
            out += ("The following inconsistencies were found and repaired:\n\n"
                    f"    {self.leaks_fixed} leaked clusters\n    {self.corruptions_fixed} corruptions\n\n"
                    "Double checking the fixed image now...\n")
        if not (self.corruptions or self.leaks or self.check_errors):
            out += "No errors were found on the image.\n"
        if self.corruptions:
            out += (f"\n{self.corruptions} errors were found on the image.\n"
                    "Data may be corrupted, or further writes to the image may corrupt it.\n")
        if self.leaks:
            out += (f"\n{self.leaks} leaked clusters were found on the image.\n"
                    "This means waste of disk space, but no harm to data.\n")
        if self.check_errors:
            out += f"\n{self.check_errors} internal errors have occurred during the check.\n"
        if self.total_clusters and self.allocated_clusters:
            n = self.allocated_clusters
            out += (f"{n}/{self.total_clusters} = {n * 100 / self.total_clusters:.2f}% allocated, "
                    f"{self.fragmented_clusters * 100 / n:.2f}% fragmented, "
                    f"{self.compressed_clusters * 100 / n:.2f}% compressed clusters\n")
        if self.image_end_offset:
            out += f"Image end offset: {self.image_end_offset}\n"
        return out


def _qdict_bucket(key: str) -> int:
    # QEMU's QDict bucket (tdb_hash % 512): its JSON output lists keys bucket by bucket.
    value = 0x238F13AF * len(key) & 0xFFFFFFFF
    for i, ch in enumerate(key.encode()):
        value = (value + (ch << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345 & 0xFFFFFFFF) % 512


def _hexalt(value: int) -> str:
    return f"{value:#x}" if value else "0"  # C's "%#x"


def _round_up(value: int, align: int) -> int:
    return -(-value // align) * align


# Refcounts of each width (refcount_order 0..6) in memory: an array of the smallest C type that holds them.
_REFCOUNT_TYPECODES = "BBBBHIQ"


def _last_nonzero(counts: array) -> int:
    """Index of the last non-zero element of `counts`, -1 if there is none (in C, not per element)."""
    return (len(counts.tobytes().rstrip(b"\0")) + counts.itemsize - 1) // counts.itemsize - 1


class _CheckAborted(Exception):
    """The check itself failed: qemu-img prints "Check failed: <strerror>" and no report."""


class _Checker:
    """One check pass over one open qcow2 image (ref: qcow2_check_refcounts)."""

    def __init__(self, file: BlockFile, h: Qcow2Header, res: CheckResult) -> None:
        self.file, self.h, self.res = file, h, res
        self.bits, self.cs = h.cluster_bits, h.cluster_size
        self.rb_entries = self.cs * 8 >> h.refcount_order
        self.refcount_max = (1 << h.refcount_bits) - 1
        self.reftable = decode_u64_table(file.pread(h.refcount_table_offset, h.refcount_table_clusters * self.cs))
        self.l1 = decode_u64_table(file.pread(h.l1_table_offset, h.l1_size * 8))
        self.snapshots, self.snapshots_size = [], 0  # the usual case: no snapshot table to decode
        if h.nb_snapshots:
            table = read_snapshot_table(file, h, res.filename)
            self.snapshots, self.snapshots_size = table.snapshots, table.size
        self.typecode = _REFCOUNT_TYPECODES[h.refcount_order]
        self.blocks: dict[int, array] = {}  # decoded refcount blocks by offset
        self.file_size = file.size()  # kept current by calculate() and the repairs that grow the file
        self.no_block = self.zeros(self.rb_entries)  # the refcounts where the reftable has no block
        self.imrt = self.zeros(_round_up(self.file_size, self.cs) >> self.bits)  # in-memory refcounts
        self.protected: list[tuple[str, int, int]] = []  # metadata a rebuild must not overwrite
        self.signaled = self.dead = False  # dead: qemu made the node unusable (no clean close)
        # The set entries of active L2 tables as counted, by table offset, for check_copied
        # not to read and scan them again; None once the budget is spent.
        self.kept_l2: dict[int, list[tuple[int, int]]] | None = {}
        self.kept_entries = 0

    def zeros(self, count: int) -> array:
        """`count` refcounts of 0, as the in-memory refcount table holds them."""
        return array(self.typecode, bytes(max(count, 0) * array(self.typecode).itemsize))

    def say(self, line: str) -> None:
        self.res.messages.append(line)

    def corrupt(self, line: str) -> None:
        self.say(line)
        self.res.corruptions += 1

    def signal(self, what: str) -> None:
        """ref: qcow2_signal_corruption: fatal (the image is marked corrupt) when writable."""
        if self.signaled and (not self.file.writable or self.dead):
            return
        self.signaled = True
        if not self.file.writable:
            self.say(f"qcow2: Image is corrupt: {what}; further non-fatal corruption events will be suppressed")
            return
        self.say(f"qcow2: Marking image as corrupt: {what}; further corruption events will be suppressed")
        self.file.pwrite(INCOMPAT_OFFSET, encode_u64(self.h.incompatible_features | INCOMPAT_CORRUPT))
        self.file.flush()
        self.dead = True

    # -- counting references (calculate_refcounts) -----------------------------------------

    def inc(self, offset: int, size: int) -> None:  # ref: qcow2_inc_refcounts_imrt
        if size <= 0:
            return
        if offset + size - self.file_size >= self.cs:
            self.corrupt("ERROR: counting reference for region exceeding the end of the file by one "
                         f"cluster or more: offset {offset:#x} size {size:#x}")
            return
        last = (offset + size - 1) >> self.bits
        if last >= len(self.imrt):
            self.imrt.extend(self.zeros(last + 1 - len(self.imrt)))
        for k in range(offset >> self.bits, last + 1):
            if self.imrt[k] == self.refcount_max:
                self.corrupt(f"ERROR: overflow cluster offset={k << self.bits:#x}")
                self.say("Use qemu-img amend to increase the refcount entry width or qemu-img convert "
                         "to create a clean copy if the image cannot be opened for writing")
            else:
                self.imrt[k] += 1

    def calculate(self, fix: int) -> bool:
        """Count every reference; True if the refcount structure needs a rebuild."""
        h = self.h
        self.file_size = self.file.size()
        self.inc(0, self.cs)
        self.check_l1(h.l1_table_offset, h.l1_size, fix, frag=True)
        for sn in self.snapshots:
            if sn.l1_table_offset % self.cs:
                self.corrupt(f"ERROR snapshot {sn.id} ({sn.name}) l1_offset={_hexalt(sn.l1_table_offset)}: "
                             "L1 table is not cluster aligned; snapshot table entry corrupted")
            elif sn.l1_size > MAX_L1_ENTRIES:
                self.corrupt(f"ERROR snapshot {sn.id} ({sn.name}) l1_size={_hexalt(sn.l1_size)}: "
                             "L1 table is too large; snapshot table entry corrupted")
            else:
                self.check_l1(sn.l1_table_offset, sn.l1_size, fix, frag=False)
        self.inc(h.snapshots_offset, self.snapshots_size)
        self.inc(h.refcount_table_offset, len(self.reftable) * 8)
        self.check_bitmaps()
        return self.check_refblocks(fix)

    def check_l1(self, offset: int, size: int, fix: int, frag: bool) -> None:  # ref: check_refcounts_l1
        if not size:
            return
        self.inc(offset, size * 8)
        for _, entry in nonzero_entries(self.file.pread(offset, size * 8)):
            if entry & L1E_RESERVED_MASK:
                self.corrupt(f"ERROR found L1 entry with reserved bits set: {entry:x}")
            l2_offset = entry & L1E_OFFSET_MASK
            self.inc(l2_offset, self.cs)
            if l2_offset % self.cs:
                self.corrupt(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted")
            self.check_l2(l2_offset, fix, frag)

    def check_l2(self, l2_offset: int, fix: int, frag: bool) -> None:  # ref: check_refcounts_l2
        next_contiguous = 0
        entries = nonzero_entries(self.file.pread(l2_offset, self.cs))  # 0 is unallocated: nothing to count
        if frag and not fix & FIX_ERRORS:  # a repair of errors may rewrite entries in this loop
            self.keep_l2(l2_offset, entries)
        for i, entry in entries:
            kind = classify_l2(entry)
            if kind is ClusterType.COMPRESSED:
                self.count_compressed(entry, frag)
                continue
            if entry & L2E_STD_RESERVED_MASK:
                self.corrupt(f"ERROR found l2 entry with reserved bits set: {entry:x}")
            if kind in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC) and not self.unaligned_fixed(
                    l2_offset + 8 * i, entry, fix):
                offset = entry & L2E_OFFSET_MASK
                if frag:
                    self.res.allocated_clusters += 1
                    self.res.fragmented_clusters += bool(next_contiguous and offset != next_contiguous)
                    next_contiguous = offset + self.cs
                self.inc(offset, self.cs)

    def keep_l2(self, l2_offset: int, entries: list[tuple[int, int]]) -> None:
        self.kept_entries += len(entries)
        if self.kept_l2 is not None and self.kept_entries <= KEPT_L2_ENTRIES:
            self.kept_l2[l2_offset] = entries
        else:
            self.kept_l2 = None  # over the budget: check_copied reads every table again

    def count_compressed(self, entry: int, frag: bool) -> None:
        extent = compressed_extent(entry, self.bits)
        if entry & QCOW_OFLAG_COPIED:
            self.corrupt(f"ERROR: coffset={extent.host_offset:#x}: copied flag must never be set for "
                         "compressed clusters")
        self.inc(extent.host_offset, extent.length)
        if frag:  # compressed clusters count as fragmented by nature
            self.res.allocated_clusters += 1
            self.res.compressed_clusters += 1
            self.res.fragmented_clusters += 1

    def unaligned_fixed(self, entry_offset: int, entry: int, fix: int) -> bool:
        """Report an unaligned host offset; True if it was repaired (to ZERO_PLAIN)."""
        offset = entry & L2E_OFFSET_MASK
        if not offset % self.cs:
            return False
        self.res.corruptions += 1
        if not entry & QCOW_OFLAG_ZERO:
            self.say(f"ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted.")
            return False
        self.say(f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} offset={offset:x}: Preallocated cluster "
                 "is not properly aligned; L2 entry corrupted.")
        if fix & FIX_ERRORS:  # ref: fix_l2_entry_by_zero
            self.file.pwrite(entry_offset, encode_u64(QCOW_OFLAG_ZERO))
            self.file.flush()
            self.res.corruptions -= 1
            self.res.corruptions_fixed += 1
        return bool(fix & FIX_ERRORS)

    def bitmap_directory(self) -> BitmapDirectory | None:
        """Where the bitmaps extension's directory is (None: no bitmaps)."""
        if self.h.extension(EXT_BITMAPS) is None:  # the usual case: no need to load the bitmap decoder
            return None
        from imgchain.formats.qcow2_bitmaps import find_bitmap_directory
        return find_bitmap_directory(self.res.filename, self.h)

    def check_bitmaps(self) -> None:  # ref: qcow2_check_bitmaps_refcounts
        where = self.bitmap_directory()
        if where is None or not where.nb_bitmaps:
            return
        from imgchain.formats.qcow2_bitmaps import bitmap_directory_entries
        self.inc(where.offset, where.size)
        directory = self.file.pread(where.offset, where.size)
        try:  # nothing else in this loop raises CorruptImage
            for bitmap in bitmap_directory_entries(self.res.filename, directory, where.nb_bitmaps):
                self.check_bitmap_table(bitmap.table_offset, bitmap.table_size)
        except CorruptImage:  # bitmap_list_load fails: the check does too
            self.res.corruptions += 1
            raise _CheckAborted("Invalid argument") from None

    def check_bitmap_table(self, table_offset: int, table_size: int) -> None:
        self.inc(table_offset, table_size * 8)
        for entry in decode_u64_table(self.file.pread(table_offset, table_size * 8)):
            offset = entry & BME_OFFSET_MASK
            if entry & BME_RESERVED_MASK or (offset and (entry & BME_ALL_ONES or offset % self.cs)):
                self.res.corruptions += 1  # qemu counts these without a message
            elif offset:
                self.inc(offset, self.cs)

    def check_refblocks(self, fix: int) -> bool:  # ref: check_refblocks
        rebuild = False
        for i in itertools.compress(range(len(self.reftable)), self.reftable):  # an empty entry has nothing to check
            entry = self.reftable[i]
            offset = entry & REFT_OFFSET_MASK
            if entry & REFT_RESERVED_MASK:
                self.corrupt(f"ERROR refcount table entry {i} has reserved bits set")
                rebuild = True
            elif offset % self.cs:
                self.corrupt(f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted")
                rebuild = True
            elif offset >> self.bits >= len(self.imrt):
                self.corrupt(f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} refcount block {i} is outside image")
                if fix & FIX_ERRORS:  # grow the file so that the block lies inside it
                    self.file.truncate(offset + self.cs)
                    self.file_size = self.file.size()
                    self.imrt.extend(self.zeros((offset >> self.bits) + 1 - len(self.imrt)))
                    self.res.corruptions -= 1
                    self.res.corruptions_fixed += 1
                    self.inc(offset, self.cs)
            elif offset:
                self.inc(offset, self.cs)
                if self.imrt[offset >> self.bits] != 1:
                    self.corrupt(f"ERROR refcount block {i} refcount={self.imrt[offset >> self.bits]}")
                    rebuild = True
        return rebuild

    # -- on-disk refcounts -----------------------------------------------------------------

    def refblock(self, index: int) -> array | None:
        """The refcounts of reftable entry `index` (all 0 without a block); None when
        its block is unusable (ref: qcow2_get_refcount)."""
        block = self.reftable[index] & REFT_OFFSET_MASK if index < len(self.reftable) else 0
        if not block:
            return self.no_block
        if block % self.cs:
            self.signal(f"Refblock offset {_hexalt(block)} unaligned (reftable index: {_hexalt(index)})")
            return None
        if block not in self.blocks:
            counts = decode_refcount_block(self.file.pread(block, self.cs), self.h.refcount_order)
            self.blocks[block] = counts if isinstance(counts, array) else array(self.typecode, counts)
        return self.blocks[block]

    def disk_refcount(self, cluster: int) -> int | None:
        """ref: qcow2_get_refcount; None when the refcount block is unusable."""
        counts = self.refblock(cluster // self.rb_entries)
        return None if counts is None else counts[cluster % self.rb_entries]

    def set_refcounts(self, values: dict[int, int]) -> None:
        """Write 16-bit refcounts: the raises first (synced), then the decreases (synced)."""
        raises = {c: v for c, v in values.items() if v > (self.disk_refcount(c) or 0)}
        for batch in (raises, {c: v for c, v in values.items() if c not in raises}):
            for cluster, value in batch.items():
                block = self.reftable[cluster // self.rb_entries] & REFT_OFFSET_MASK
                self.blocks[block][cluster % self.rb_entries] = value
                self.file.pwrite(block + 2 * (cluster % self.rb_entries), value.to_bytes(2, "big"))
            if batch:
                self.file.flush()

    def compare(self, fix: int) -> tuple[int, bool]:
        """ref: compare_refcounts. Returns (highest cluster in use, rebuild needed).

        A refcount block that matches the references is passed over as a whole."""
        highest, rebuild, fixes = 0, False, {}
        for start in range(0, len(self.imrt), self.rb_entries):
            references = self.imrt[start:start + self.rb_entries]
            counts = self.refblock(start // self.rb_entries)
            if counts is not None and counts[:len(references)] == references:
                last = _last_nonzero(references)
                highest = start + last if last >= 0 else highest
                continue
            for cluster in range(start, start + len(references)):
                highest, rebuild = self.compare_one(cluster, fix, fixes, highest, rebuild)
        self.set_refcounts(fixes)
        return highest, rebuild

    def compare_one(self, cluster: int, fix: int, fixes: dict[int, int], highest: int,
                    rebuild: bool) -> tuple[int, bool]:
        """compare() for one cluster: report a refcount that differs from the references
        (noting its fix in `fixes`). Returns the new (highest, rebuild)."""
        reference, refcount = self.imrt[cluster], self.disk_refcount(cluster)
        if refcount is None:
            self.say(f"Can't get refcount for cluster {cluster}: {EIO}")
            self.res.check_errors += 1
            return highest, rebuild
        if refcount or reference:
            highest = cluster
        if refcount == reference:
            return highest, rebuild
        fixed = refcount != 0 and bool(fix & (FIX_LEAKS if refcount > reference else FIX_ERRORS))
        label = "Repairing" if fixed else "ERROR" if refcount < reference else "Leaked"
        self.say(f"{label} cluster {cluster} refcount={refcount} reference={reference}")
        if fixed:
            fixes[cluster] = reference
        counter = ("leaks" if refcount > reference else "corruptions") + ("_fixed" if fixed else "")
        setattr(self.res, counter, getattr(self.res, counter) + 1)
        return highest, rebuild or refcount == 0

    # -- rebuilding the refcount structure -------------------------------------------------

    def alloc_imrt(self, count: int, first_free: int) -> tuple[int, int]:
        """ref: alloc_clusters_imrt. Returns (host offset, the first gap seen)."""
        cluster, run, gap = first_free, 0, None
        while cluster < len(self.imrt) and run < count:
            run = 0 if self.imrt[cluster] else run + 1
            gap = cluster if gap is None and run else gap
            cluster += 1
        self.imrt.extend(self.zeros(cluster + count - run - len(self.imrt)))
        start = cluster - run
        self.imrt[start:start + count] = array(self.typecode, [1]) * count
        return start << self.bits, first_free if gap is None else gap

    def write_refblocks(self, first: int, end: int, table: list[int]) -> bool:
        """ref: rebuild_refcounts_write_refblocks. True if the new reftable grew."""
        grown, first_free, cluster = False, 0, first
        while cluster < end:
            if not self.imrt[cluster]:
                cluster += 1
                continue
            index = cluster // self.rb_entries
            start = index * self.rb_entries
            if index >= len(table) or not table[index]:
                offset, first_free = self.alloc_imrt(1, max(first_free, start))
                end = max(end, (offset >> self.bits) + 1)
                if index >= len(table):
                    table.extend([0] * (_round_up((index + 1) * 8, self.cs) // 8 - len(table)))
                    grown = True
                table[index] = offset
            counts = self.imrt[start:start + self.rb_entries]
            counts.extend(self.zeros(self.rb_entries - len(counts)))
            self.guarded_write("refblock", table[index], encode_refcount16(counts))
            cluster = start + self.rb_entries
        return grown

    def guarded_write(self, what: str, offset: int, data: bytes) -> None:
        """Refuse to overwrite live metadata (ref: qcow2_check_metadata_overlap, "cached" mode)."""
        start, end = offset & ~(self.cs - 1), _round_up(offset + len(data), self.cs)
        hit = next((name for name, at, size in self.protected if size and at < end and start < at + size), None)
        if hit:
            self.signal(f"Preventing invalid write on metadata (overlaps with {hit})")
            self.say(f"ERROR writing {what}: {EIO}")
            raise _CheckAborted(EIO)
        self.file.pwrite(offset, data)

    def metadata(self) -> list[tuple[str, int, int]]:
        h, cs = self.h, self.cs
        bitmaps = self.bitmap_directory()
        bitmaps_at, bitmaps_size = (bitmaps.offset, bitmaps.size) if bitmaps else (0, 0)
        return ([("active L1 table", h.l1_table_offset, h.l1_size * 8),
                 ("refcount table", h.refcount_table_offset, len(self.reftable) * 8),
                 ("snapshot table", h.snapshots_offset, self.snapshots_size)]
                + [("inactive L1 table", sn.l1_table_offset, sn.l1_size * 8) for sn in self.snapshots]
                + [("active L2 table", e & L1E_OFFSET_MASK, cs) for e in self.l1 if e & L1E_OFFSET_MASK]
                + [("refcount block", e & REFT_OFFSET_MASK, cs) for e in self.reftable if e & REFT_OFFSET_MASK]
                + [("bitmap directory", bitmaps_at, bitmaps_size)])

    def rebuild(self) -> None:
        """ref: rebuild_refcount_structure. The old structure is left to leak."""
        self.protected, table = self.metadata(), []
        self.blocks.clear()
        grown = self.write_refblocks(0, len(self.imrt), table)
        while grown:  # placing the table may need more refblocks, and so a larger table
            clusters = _round_up(len(table) * 8, self.cs) // self.cs
            offset, _ = self.alloc_imrt(clusters, 0)
            grown = self.write_refblocks(offset >> self.bits, (offset >> self.bits) + clusters, table)
        self.guarded_write("reftable", offset, encode_u64_table(array("Q", table)))
        self.file.flush()  # the blocks and the table, before the header points to them
        self.file.pwrite(REFTABLE_FIELDS_OFFSET, encode_u64(offset) + clusters.to_bytes(4, "big"))
        self.file.flush()
        self.h.refcount_table_offset, self.h.refcount_table_clusters = offset, clusters
        self.reftable = array("Q", table)

    def rebuild_and_recount(self) -> int:
        """Rebuild, count again, and free the old structure (only the leaks repair is kept)."""
        old = dataclasses.replace(self.res)
        self.say("Rebuilding refcount structure")
        self.rebuild()
        saved = self.res
        saved.corruptions = saved.leaks = 0
        self.imrt = self.zeros(len(self.imrt))
        self.calculate(0)
        self.res = CheckResult(saved.filename, saved.format, messages=saved.messages)
        highest, broken = self.compare(FIX_LEAKS)
        if broken:
            self.say("ERROR rebuilt refcount structure is still broken")
        fresh_leaks, self.res = self.res.leaks, saved
        saved.corruptions_fixed += max(0, old.corruptions - saved.corruptions)
        saved.leaks_fixed += max(0, old.leaks - saved.leaks)
        saved.leaks += fresh_leaks
        return highest

    # -- OFLAG_COPIED ----------------------------------------------------------------------

    def check_copied(self, fix: int) -> None:  # ref: check_oflag_copied
        res = self.res
        repair = bool(fix & FIX_ERRORS or fix and not (res.check_errors or res.corruptions or res.leaks))
        label = "Repairing" if repair else "ERROR"
        for i, entry in enumerate(self.l1):
            l2_offset = entry & L1E_OFFSET_MASK
            refcount = self.disk_refcount(l2_offset >> self.bits) if l2_offset else None
            if refcount is None:
                continue
            if (refcount == 1) != bool(entry & QCOW_OFLAG_COPIED):
                self.corrupt(f"{label} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={entry:x} "
                             f"refcount={refcount}")
                if repair:
                    self.l1[i] = entry ^ QCOW_OFLAG_COPIED
                    self.file.pwrite(self.h.l1_table_offset + 8 * i, encode_u64(self.l1[i]))
                    self.file.flush()
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            self.check_copied_l2(l2_offset, repair, label)

    def check_copied_l2(self, l2_offset: int, repair: bool, label: str) -> None:
        entries = self.kept_l2.pop(l2_offset, None) if self.kept_l2 is not None else None
        if entries is None:
            entries = nonzero_entries(self.file.pread(l2_offset, self.cs))
        repaired = []
        for j, entry in entries:
            if classify_l2(entry) not in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                continue
            refcount = self.disk_refcount((entry & L2E_OFFSET_MASK) >> self.bits)
            if refcount is None or (refcount == 1) == bool(entry & QCOW_OFLAG_COPIED):
                continue
            self.corrupt(f"{label} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={refcount}")
            if repair:
                repaired.append(j)
        if repaired:
            table = decode_u64_table(self.file.pread(l2_offset, self.cs))
            for j in repaired:
                table[j] ^= QCOW_OFLAG_COPIED
            self.file.pwrite(l2_offset, encode_u64_table(table))
            self.file.flush()
            self.res.corruptions -= len(repaired)
            self.res.corruptions_fixed += len(repaired)

    def run(self, fix: int) -> CheckResult:
        """ref: qcow2_check_refcounts. Raises _CheckAborted where that returns an error."""
        res = self.res
        res.total_clusters = _round_up(self.h.size, self.cs) // self.cs
        rebuild = self.calculate(fix)
        before_compare = dataclasses.replace(res)
        highest, needs_rebuild = self.compare(0)
        if (rebuild or needs_rebuild) and fix & FIX_ERRORS:
            highest = self.rebuild_and_recount()
        elif fix and (rebuild or needs_rebuild):
            self.say("ERROR need to rebuild refcount structures")
            res.check_errors += 1
            raise _CheckAborted(EIO)
        elif fix and (res.leaks or res.corruptions):  # again, this time repairing
            self.res = dataclasses.replace(before_compare)
            highest, _ = self.compare(fix)
        self.check_copied(fix)
        self.res.image_end_offset = (highest + 1) * self.cs
        return self.res


def _stale_bitmaps(h: Qcow2Header) -> bool:
    return h.extension(EXT_BITMAPS) is not None and not h.autoclear_features & AUTOCLEAR_BITMAPS


def _open_for_repair(path: str, h: Qcow2Header) -> BlockFile:
    """The image file opened for writing, as qemu's read-write open leaves it."""
    if h.refcount_order != 4:
        raise ReadOnlyImage(path, f"cannot repair: refcount width is {h.refcount_bits} bits; "
                                  "imgchain writes 16-bit refcounts only")
    file = BlockFile(path, writable=True, lock=ACTIVE_WRITER)
    if _stale_bitmaps(h):  # qemu drops a bitmaps extension whose autoclear bit was cleared
        kept = [e for e in h.extensions if e.magic != EXT_BITMAPS]
        file.pwrite(0, build_cluster0(path, h.replace(extensions=kept)))
        file.flush()
    return file


def _mark_clean(file: BlockFile, h: Qcow2Header, consistent: bool) -> None:
    """Clear the dirty bit, and the corrupt bit if nothing is left to fix (ref: qcow2_mark_clean,
    qcow2_mark_consistent, and the clean close of a read-write node)."""
    bits = h.incompatible_features & ~INCOMPAT_DIRTY & ~(INCOMPAT_CORRUPT if consistent else 0)
    if bits != h.incompatible_features:
        file.pwrite(INCOMPAT_OFFSET, encode_u64(bits))
        file.flush()


def _check_qcow2(path: str, file: BlockFile, header: Qcow2Header, fix: int) -> CheckResult:
    """One check (repairing when fix != 0) and, if anything was fixed, the double check."""
    res = CheckResult(path, "qcow2", messages=list(_STALE_BITMAPS) if _stale_bitmaps(header) else [])
    checker = _Checker(file, header, res)
    try:
        res = checker.run(fix)
    except _CheckAborted as exc:
        res.messages.append(f"Check failed: {exc}")
        res.aborted = True
    if fix and not checker.dead:
        _mark_clean(file, header, not (res.aborted or res.corruptions or res.check_errors))
    if res.aborted or not (res.corruptions_fixed or res.leaks_fixed):
        return res
    again = _Checker(file, read_header(file, path), CheckResult(path, "qcow2", messages=res.messages)).run(0)
    again.corruptions_fixed, again.leaks_fixed = res.corruptions_fixed, res.leaks_fixed
    return again


def check_image(path: str, repair: str | None = None, force_share: bool = False,
                trust_backing: bool = False) -> CheckResult:
    """`qemu-img check [-r leaks|all] path`: check (and repair) the top image of a chain.

    The whole backing chain is opened first, read-only, as qemu-img does; an image or
    backing file that does not open raises that error (the CLI turns it into exit
    code 1). A raw image gives exit code 63 ("This image format does not support
    checks"). With `repair` the image file itself is opened for writing, which a
    dirty or corrupt-marked image allows here as in qemu-img check; only 16-bit
    refcounts can be repaired (ReadOnlyImage otherwise)."""
    if repair not in REPAIR_MODES:
        raise ValueError(f"Unknown option for -r: {repair!r} (expecting 'leaks' or 'all')")
    # Repair takes the writer's lock on its own descriptor, so the chain itself locks nothing.
    top = open_backing_chain(path, writable=False, force_share=force_share or repair is not None,
                             trust_backing=trust_backing)
    try:
        if top.format_name != "qcow2":
            return CheckResult(path, top.format_name, aborted=True,
                               messages=["This image format does not support checks"])
        # A copy: a rebuild moves the refcount table.
        header: Qcow2Header = top.driver.header.replace()  # type: ignore[attr-defined]
        fix = REPAIR_MODES[repair]
        file = _open_for_repair(path, header) if fix else top.driver.file  # type: ignore[attr-defined]
        try:
            res = _check_qcow2(path, file, header, fix)
        finally:
            if fix:
                file.close()
    finally:
        close_chain(top)
    if res.check_errors and not res.aborted:
        res.messages.append("Check failed")
    return res
