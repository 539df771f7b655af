"""Allocation map of a whole chain: what `qemu-img map` (7.2) reports.

For every guest range the first layer, top down, whose block status says
data or zero answers it (ref: get_block_status in qemu-img.c): `depth` is
that layer's index (0 = active), `offset` the host offset in its file where
there is one. A range no layer allocates reads as zeros: `present` false,
`zero` true, at the bottom layer's depth, or at the depth of the first layer
whose backing ends before the range starts (QEMU's "offset >= backing
length" rule). Compressed clusters are data without an offset. Like QEMU, a
qcow2 layer whose file looks metadata-preallocated (many more referenced
clusters than the file really occupies; ref:
qcow2_detect_metadata_preallocation) has its data clusters checked against
holes in its file, which then show as `zero` and `data` together.

The walk is a loop over the layers, never a recursion, so a chain of any
depth maps: each layer is asked only about the ranges the layers above leave
unallocated. A layer's answer comes from its allocated runs, worked out once
per L2 table (or once per raw file) in one pass over the allocated entries
only (`itertools.compress` skips the unallocated ones at C speed), and kept
as plain tuples. Adjacent runs are merged as qemu-img merges them
(ref: entry_mergeable), and `json_map` writes qemu-img's JSON text byte for
byte (ref: dump_map_entry). This module only reads.
"""

from __future__ import annotations

import bisect
import gc
import itertools
from array import array
from collections.abc import Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any

from imgchain.formats import CorruptImage
from imgchain.formats.qcow2_tables import (
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_ZERO,
    REFT_OFFSET_MASK,
    decode_refcount_block,
    l1_l2_offset,
)

from .chain import close_chain, open_backing_chain
from .errors import ImgchainError
from .extent import Status
from .info import full_backing_filename, virtual_size
from .node import Node
from .raw import RawDriver

MapEntry = dict[str, Any]

Run = tuple[int, int, int, bool, bool, bool, int]
"""One map entry: (start, end, depth, present, zero, data, offset); offset -1 for none."""


COMPRESSED_IN_HUMAN = "File contains external, encrypted or compressed clusters."
NO_OFFSET = -1
_FAST_HOST_LIMIT = 1 << 55  # below it, adding a cluster to an entry cannot carry into its flags


class MapError(ImgchainError):
    """Human map output cannot show the chain; `output` is what was printed first."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output


# ---------------------------------------------------------------------------
# Public entry points


def map_chain(path: str, force_share: bool = False, trust_backing: bool = False) -> list[MapEntry]:
    """`qemu-img map --output=json [-U] path`: the entries of the whole chain.

    The chain is opened with QEMU's read locks (`ImageLockedError` while
    another process writes it) unless `force_share`."""
    return [_entry(run) for run in _map_path(path, force_share, trust_backing)]


def map_json(path: str, force_share: bool = False, trust_backing: bool = False) -> str:
    """The text `qemu-img map --output=json [-U] path` prints, byte for byte."""
    return "".join(map_json_pieces(path, force_share, trust_backing))


def map_json_pieces(path: str, force_share: bool = False, trust_backing: bool = False) -> Iterator[str]:
    """`map_json`'s text in consecutive pieces, to be written as they are
    made: the whole text of a large map is as big again as the map itself.
    The chain is mapped (and any error raised) before the first piece."""
    return json_map_pieces(_map_path(path, force_share, trust_backing))


def map_node(top: Node) -> list[MapEntry]:
    """The map entries of an opened chain whose active node is `top`."""
    return [_entry(run) for run in map_runs(top)]


def _map_path(path: str, force_share: bool, trust_backing: bool) -> list[Run]:
    top = open_backing_chain(path, force_share=force_share, trust_backing=trust_backing)
    try:
        return map_runs(top)
    finally:
        close_chain(top)


def chain_filenames(path: str) -> list[str]:
    """The file names qemu shows for each depth of the chain of `path`.

    Only headers are read, so no locks are taken (the map itself took them)
    and no backing file is refused (the map itself was allowed to read them)."""
    top = open_backing_chain(path, force_share=True, trust_backing=True)
    try:
        names = [path]
        for node in top.chain()[:-1]:
            names.append(full_backing_filename(names[-1], node.driver.backing_file or ""))
        return names
    finally:
        close_chain(top)


# ---------------------------------------------------------------------------
# Walking the chain


def map_runs(top: Node) -> list[Run]:
    """The merged map runs of an opened chain, in guest order.

    Python's cyclic garbage collector is off meanwhile: the runs are tuples
    of numbers, which hold no cycles, and the collector would walk them
    again each time their number grows by a quarter."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return merge_runs(chain_runs(top))
    finally:
        if enabled:
            gc.enable()


def chain_runs(top: Node) -> list[Run]:
    """Who answers each guest range of an opened chain, in guest order, not
    merged: each run is one layer's piece (cut by the layers above).

    Layer by layer: `pending` holds the ranges no layer above allocates; the
    part of a range past the next layer's end (or with no next layer) is
    answered, unallocated, by this layer."""
    nodes = top.chain()
    sizes = [virtual_size(node) for node in nodes] + [0]
    if sizes[0] == 0:
        return [(0, 0, 0, False, False, False, NO_OFFSET)]
    runs: list[Run] = []
    pending = [(0, sizes[0])]
    for depth, node in enumerate(nodes):  # one layer at a time: what it does not answer is freed early
        pending = _sweep(_Layer(node, depth, sizes[depth]), pending, sizes[depth + 1], runs)
        if not pending:
            break
    runs.sort(key=itemgetter(0))  # disjoint, none empty: no two start alike
    return runs


def _sweep(layer: "_Layer", pending: list[tuple[int, int]], limit: int, runs: list[Run]) -> list[tuple[int, int]]:
    """Answer the sorted, disjoint `pending` ranges from one layer: what it
    allocates becomes runs; what it leaves unallocated (the holes between
    its pieces) is returned for the next layer below `limit` (the backing's
    size) and reads as zeros here past it (with no backing, `limit` 0,
    everywhere).

    One walk over the layer's pieces that meet the ranges: a piece inside a
    range is taken as it is, one that sticks out is cut to it."""
    pieces = layer.pieces(pending)
    starts = list(map(itemgetter(0), pieces))
    starts.append(layer.size)  # no piece starts at or past the end
    ends = list(map(itemgetter(1), pieces))
    left: list[tuple[int, int]] = []
    answer = runs.append
    # the usual case: the backing answers every hole
    hole = left.append if limit >= layer.size else _holes_past(limit, layer.depth, left, runs)
    j = 0
    for start, end in pending:
        j = bisect.bisect_right(ends, start, j)
        pos = start
        while starts[j] < end:
            lo, hi = starts[j], ends[j]
            if lo > pos:
                hole((pos, lo))
                pos = lo
            piece = pieces[j]
            if hi > end:  # it sticks out: the next range may start in it too
                answer(_cut(piece, pos, end))
                break
            answer(piece if pos == lo else _cut(piece, pos, hi))
            pos = hi
            j += 1
        else:
            if pos < end:
                hole((pos, end))
    return left


def _cut(run: Run, lo: int, hi: int) -> Run:
    """`run` cut to [lo, hi), its offset moved along."""
    start, _, depth, present, zero, data, offset = run
    return (lo, hi, depth, present, zero, data, offset + lo - start if offset >= 0 else offset)


def _holes_past(limit: int, depth: int, left: list[tuple[int, int]], runs: list[Run]) -> Callable[[tuple[int, int]], None]:
    """Where the holes of a layer whose backing ends at `limit` go: below it
    to the next layer (`left`), past it they read as zeros at this layer's
    depth (with no backing, `limit` 0, everywhere)."""
    zeros = (depth, False, True, False, NO_OFFSET)

    def add(span: tuple[int, int]) -> None:
        lo, hi = span
        if lo < limit:
            left.append((lo, min(hi, limit)))
        if hi > limit:
            runs.append((max(lo, limit), hi) + zeros)
    return add


def merge_runs(runs: list[Run]) -> list[Run]:
    """Join adjacent runs the way qemu-img map does (entry_mergeable: same
    depth and flags, offsets that continue or neither has one)."""
    if not runs:
        return []
    out: list[Run] = []
    keep = out.append
    prev = runs[0]
    for run in itertools.islice(runs, 1, None):
        if run[2] == prev[2] and run[3:6] == prev[3:6] and prev[1] > prev[0]:  # the depth first: most differ there
            offset = prev[6]
            if run[6] == (offset + prev[1] - prev[0] if offset >= 0 else NO_OFFSET):
                prev = (prev[0], run[1]) + prev[2:]
                continue
        keep(prev)
        prev = run
    keep(prev)
    return out


# ---------------------------------------------------------------------------
# One layer's view


class _Layer:
    """What one node of the chain stores, as QEMU's block layer sees it."""

    def __init__(self, node: Node, depth: int, size: int) -> None:
        self.node = node
        self.depth = depth
        self.size = size
        self.is_qcow2 = node.format_name == "qcow2"
        self._units: dict[int, list[Run]] = {}
        self._preallocated: bool | None = None
        self._host: RawDriver | None = None

    def pieces(self, ranges: list[tuple[int, int]]) -> list[Run]:
        """This layer's allocated runs, in order, in every L2 table that meets
        the sorted `ranges` (the whole file of a raw layer, which has no
        holes); between them the layer allocates nothing."""
        if not self.is_qcow2:
            return self._unit(-1)
        driver = self.node.driver
        span = driver.geo.l2_span  # type: ignore[attr-defined]
        l1 = driver.l1  # type: ignore[attr-defined]
        out: list[Run] = []
        ends = list(map(itemgetter(1), ranges))
        k, index = 0, -1
        while k < len(ranges):  # per table, not per range: a table may hold thousands
            index = max(index + 1, ranges[k][0] // span)
            if index >= len(l1) or l1_l2_offset(l1[index]):  # past L1: the driver reports it
                out += self._unit(index)
            k = bisect.bisect_right(ends, (index + 1) * span, k)  # the first range that goes on past it
        return out

    def _unit(self, index: int) -> list[Run]:
        """The runs of one L2 table's range (or of the whole raw file, -1)."""
        unit = self._units.get(index)
        if unit is None:
            unit = self._units[index] = self._table_runs(index) if index >= 0 else self._raw_runs()
        return unit

    def _raw_runs(self) -> list[Run]:
        # Holes of the file are zero at their offset; past the file's end (up
        # to the sector-rounded size) qemu sees a hole as well.
        return [(e.guest_offset, e.end, self.depth, True, e.status is Status.ZERO,
                 e.status is Status.DATA, e.guest_offset)
                for e in self.node.driver.block_status(0, self.size)]

    def _table_runs(self, l1_index: int) -> list[Run]:
        """The allocated runs of one L2 table; data split at the holes of a
        preallocated file."""
        driver = self.node.driver
        bits = driver.geo.cluster_bits  # type: ignore[attr-defined]
        base = l1_index * driver.geo.l2_span  # type: ignore[attr-defined]
        _, table = driver.l2_table(l1_index)  # type: ignore[attr-defined]
        end = min(self.size, base + (len(table) << bits))
        runs = _l2_runs(table, base, end, bits, self.depth, driver.filename)
        if not any(r[5] and r[6] >= 0 for r in runs) or not self.preallocated():
            return runs
        out: list[Run] = []
        for run in runs:
            out += self._host_runs(*run[:2], run[6]) if run[5] and run[6] >= 0 else [run]
        return out

    def _host_runs(self, lo: int, hi: int, host: int) -> list[Run]:
        """Data at `host`, with the holes of the qcow2 file itself as zero."""
        if self._host is None:
            self._host = RawDriver(self.node.driver.file, self.node.filename)  # type: ignore[attr-defined]
        shift = lo - host
        return [(h.guest_offset + shift, h.end + shift, self.depth, True, h.status is Status.ZERO, True,
                 h.guest_offset) for h in self._host.block_status(host, hi - lo)]

    def preallocated(self) -> bool:
        """QEMU's metadata-preallocation guess for this qcow2 file."""
        if self._preallocated is None:
            self._preallocated = _looks_preallocated(self.node.driver)
        return self._preallocated


def _l2_runs(table: array, base: int, end: int, bits: int, depth: int, filename: str) -> list[Run]:
    """The allocated runs of an L2 table over the guest range [base, end)
    (the table's range, cut at the image's end).

    One pass over the non-zero entries only (`itertools.compress` skips the
    others at C speed). A run goes on while the next entry continues it
    (the next host cluster with the same flags, or the same zero entry), so
    most entries cost one comparison; an entry with flag bits but no
    cluster is unallocated. QEMU's flags: compressed is data with no
    offset; zero, plain or with a kept cluster; normal data at its offset."""
    cs = 1 << bits
    special = QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO | (L2E_OFFSET_MASK & (cs - 1))  # not plain, aligned data
    clusters = range(base, base + (-(-(end - base) >> bits) << bits), cs)  # each entry's guest offset
    runs: list[Run] = []
    append = runs.append
    first = run_end = next_entry = -1
    step = 0
    zero = data = False
    offset = NO_OFFSET
    for guest, entry in zip(itertools.compress(clusters, table), filter(None, table)):
        if guest == run_end and entry == next_entry:
            run_end += cs
            next_entry += step
            continue
        if first >= 0:
            append((first, run_end, depth, True, zero, data, offset))
        host = entry & L2E_OFFSET_MASK
        if not entry & special and host:  # the usual entry: data at its offset
            zero, data, offset, step = False, True, host, cs
            next_entry = entry + cs if host < _FAST_HOST_LIMIT else -1
        elif entry & QCOW_OFLAG_COMPRESSED:
            zero, data, offset, next_entry = False, True, NO_OFFSET, -1
        elif host % cs:
            raise CorruptImage(filename, f"Cluster allocation offset {host:#x} unaligned (guest offset {guest:#x})")
        elif entry & QCOW_OFLAG_ZERO:
            zero, data, offset, step = True, False, host or NO_OFFSET, cs if host else 0
            next_entry = entry + step if host < _FAST_HOST_LIMIT else -1
        else:  # flag bits but no cluster: unallocated
            first = run_end = next_entry = -1
            continue
        first, run_end = guest, guest + cs
    if first >= 0:
        append((first, min(end, run_end), depth, True, zero, data, offset))
    return runs


def _looks_preallocated(driver: Any) -> bool:
    """At least as many referenced clusters as the file occupies, plus slack.

    The threshold is max(real*10/9, real+2) clusters, real being the file's
    allocated bytes in clusters; referenced means refcount > 0 among the
    clusters up to the end of the file."""
    cs = driver.cluster_size
    real = driver.file.allocated_bytes() // cs
    threshold = max(real * 10 // 9, real + 2)
    end_cluster = -(-driver.file.size() // cs)
    return _count_referenced(driver, end_cluster, threshold) >= threshold


def _count_referenced(driver: Any, end_cluster: int, limit: int) -> int:
    """Clusters below end_cluster with a non-zero refcount (stops at limit)."""
    header = driver.header
    cs = driver.cluster_size
    per_block = cs * 8 >> header.refcount_order
    table = driver.file.pread(header.refcount_table_offset, header.refcount_table_clusters * cs)
    count = 0
    for index in range(min(-(-end_cluster // per_block), len(table) // 8)):
        block = int.from_bytes(table[index * 8:index * 8 + 8], "big") & REFT_OFFSET_MASK
        if not block:
            continue
        counts = decode_refcount_block(driver.file.pread(block, cs), header.refcount_order)
        used = counts[:end_cluster - index * per_block]
        count += len(used) - used.count(0)
        if count >= limit:
            break
    return count


# ---------------------------------------------------------------------------
# Output


def _entry(run: Run) -> MapEntry:
    start, end, depth, present, zero, data, offset = run
    entry: MapEntry = {"start": start, "length": end - start, "depth": depth,
                       "present": present, "zero": zero, "data": data}
    if offset >= 0:
        entry["offset"] = offset
    return entry


_FLAGS = {(p, z, d): '"present": %s, "zero": %s, "data": %s' % tuple("true" if f else "false" for f in (p, z, d))
          for p in (False, True) for z in (False, True) for d in (False, True)}


class _Middles(dict[tuple[int, bool, bool, bool], str]):
    """An entry's text between its length and its offset, by (depth, present, zero, data)."""

    def __missing__(self, key: tuple[int, bool, bool, bool]) -> str:
        depth, *flags = key
        text = self[key] = f'"depth": {depth}, {_FLAGS[tuple(flags)]}'
        return text


def json_map(runs: list[Run]) -> str:
    """qemu-img's JSON text: one entry per line, `[` before the first, `]` after the last."""
    return "".join(json_map_pieces(runs))


def json_map_pieces(runs: list[Run], lines: int = 4096) -> Iterator[str]:
    """`json_map`'s text in consecutive pieces of so many `lines`."""
    middle = _Middles()
    yield "["
    for at in range(0, len(runs), lines):
        yield (",\n" if at else "") + ",\n".join([
            f'{{ "start": {s}, "length": {e - s}, {middle[d, p, z, a]}, "offset": {o}}}'
            if o >= 0 else
            f'{{ "start": {s}, "length": {e - s}, {middle[d, p, z, a]}}}'
            for s, e, d, p, z, a, o in itertools.islice(runs, at, at + lines)])
    yield "]\n"


def human_map(entries: list[MapEntry], top_filename: str | Sequence[str]) -> str:
    """`qemu-img map` human output for `entries`.

    `top_filename` is the active image's path (the names of the lower files
    are then derived from the chain, as qemu shows them) or a sequence of
    file names by depth. Only data that is not zero is listed. Like qemu-img,
    data without an offset (compressed clusters) cannot be shown: `MapError`
    carries the lines printed before it."""
    names = chain_filenames(top_filename) if isinstance(top_filename, str) else list(top_filename)
    lines = ["%-16s%-16s%-16s%s" % ("Offset", "Length", "Mapped to", "File")]
    for e in entries:
        if e["data"] and "offset" not in e:
            raise MapError(COMPRESSED_IN_HUMAN, "".join(line + "\n" for line in lines))
        if e["data"] and not e["zero"]:
            lines.append("%-16s%-16s%-16s%s" % (_hex(e["start"]), _hex(e["length"]),
                                                _hex(e["offset"]), names[e["depth"]]))
    return "".join(line + "\n" for line in lines)


def _hex(value: int) -> str:
    """C's "%#x": no 0x prefix for zero."""
    return f"{value:#x}" if value else "0"
