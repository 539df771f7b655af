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

Work is per extent, not per byte: unallocated L2 ranges (L1 entry 0) are
skipped as a whole, lower layers are only asked about what the layers above
leave open, and adjacent entries are merged as qemu-img does
(ref: entry_mergeable). This module only reads.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from imgchain.formats.qcow2_tables import REFT_OFFSET_MASK, decode_refcount_block, l1_l2_offset

from .chain import close_chain, open_backing_chain
from .errors import ImgchainError
from .extent import Extent, Status
from .info import full_backing_filename, virtual_size
from .node import Node
from .raw import RawDriver

MapEntry = dict[str, Any]

COMPRESSED_IN_HUMAN = "File contains external, encrypted or compressed clusters."


class MapError(ImgchainError):
    """Human map output cannot show the chain; `output` is what was printed first."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output


@dataclass(frozen=True)
class Run:
    """One map entry before it is turned into qemu's JSON shape."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None

    @property
    def end(self) -> int:
        return self.start + self.length


# ---------------------------------------------------------------------------
# Public entry points


def map_chain(path: str, force_share: bool = False, trust_backing: bool = False) -> list[MapEntry]:
    """`qemu-img map --output=json [-U] path`: the entries of the whole chain.

    The chain is opened with QEMU's read locks (`ImageLockedError` while
    another process writes it) unless `force_share`."""
    top = open_backing_chain(path, force_share=force_share, trust_backing=trust_backing)
    try:
        return map_node(top)
    finally:
        close_chain(top)


def map_node(top: Node) -> list[MapEntry]:
    """The map entries of an opened chain whose active node is `top`."""
    layers = [_Layer(node, depth) for depth, node in enumerate(top.chain())]
    size = layers[0].size
    if size == 0:
        return [_entry(Run(0, 0, 0, False, False, False))]
    runs: list[Run] = []
    _resolve(layers, 0, 0, size, runs)
    return [_entry(r) for r in merge_runs(runs)]


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
# One layer's view


class _Layer:
    """Block status of one node of the chain, as QEMU's block layer sees it."""

    def __init__(self, node: Node, depth: int) -> None:
        self.node = node
        self.depth = depth
        self.size = virtual_size(node)
        self.is_qcow2 = node.format_name == "qcow2"
        self._l2_indices: list[int] | None = None
        self._preallocated: bool | None = None
        self._host: RawDriver | None = None

    def status(self, start: int, end: int) -> list[Extent]:
        """Extents of this layer alone over [start, end), within its size."""
        if not self.is_qcow2:
            return self._raw_status(start, end)
        return self._qcow2_status(start, end)

    def _raw_status(self, start: int, end: int) -> list[Extent]:
        # Past the file's end (up to the sector-rounded size) qemu sees a hole.
        return [e if e.host_offset is not None or e.status is not Status.ZERO
                else Extent(e.guest_offset, e.length, Status.ZERO, e.guest_offset)
                for e in self.node.driver.block_status(start, end - start)]

    def _qcow2_status(self, start: int, end: int) -> list[Extent]:
        span = self.node.driver.geo.l2_span  # type: ignore[attr-defined]
        indices = self._tables()
        out: list[Extent] = []
        pos = start
        while pos < end:
            idx = pos // span
            i = bisect.bisect_left(indices, idx)
            if i < len(indices) and indices[i] == idx:
                stop = min(end, (idx + 1) * span)
                out.extend(self._l2_status(idx, pos, stop))
            else:
                nxt = indices[i] * span if i < len(indices) else end
                stop = min(end, nxt)
                out.append(Extent(pos, stop - pos, Status.UNALLOCATED))
            pos = stop
        return _merge_unallocated(out)

    def _l2_status(self, l1_index: int, start: int, end: int) -> list[Extent]:
        """Status within one L2 table: the driver is asked only about runs of
        non-zero entries; the gaps between them are unallocated."""
        driver = self.node.driver
        cs = driver.cluster_size
        base = l1_index * driver.geo.l2_span  # type: ignore[attr-defined]
        _, table = driver.l2_table(l1_index)  # type: ignore[attr-defined]
        first, last = (start - base) // cs, -(-(end - base) // cs)
        out: list[Extent] = []
        pos = start
        for a, b in _index_runs(itertools.compress(range(first, last),
                                                   itertools.islice(table, first, last))):
            lo, hi = max(start, base + a * cs), min(end, base + b * cs)
            if lo > pos:
                out.append(Extent(pos, lo - pos, Status.UNALLOCATED))
            out.extend(driver.block_status(lo, hi - lo))
            pos = hi
        if pos < end:
            out.append(Extent(pos, end - pos, Status.UNALLOCATED))
        return out

    def _tables(self) -> list[int]:
        """Sorted L1 indices that point to an L2 table."""
        if self._l2_indices is None:
            l1 = self.node.driver.l1  # type: ignore[attr-defined]
            candidates = itertools.compress(range(len(l1)), l1)
            self._l2_indices = [i for i in candidates if l1_l2_offset(l1[i])]
        return self._l2_indices

    def data_runs(self, ext: Extent) -> list[Run]:
        """Runs for a DATA extent; holes in a preallocated file read as zero."""
        assert ext.host_offset is not None
        if not (self.is_qcow2 and self.preallocated()):
            return [Run(ext.guest_offset, ext.length, self.depth, True, False, True, ext.host_offset)]
        if self._host is None:  # the qcow2 file itself, seen as a sparse file
            self._host = RawDriver(self.node.driver.file, self.node.filename)  # type: ignore[attr-defined]
        host = self._host
        shift = ext.guest_offset - ext.host_offset
        return [Run(h.guest_offset + shift, h.length, self.depth, True,
                    h.status is Status.ZERO, True, h.guest_offset)
                for h in host.block_status(ext.host_offset, ext.length)]

    def preallocated(self) -> bool:
        """QEMU's metadata-preallocation guess for this qcow2 file."""
        if self._preallocated is None:
            self._preallocated = _looks_preallocated(self.node.driver)
        return self._preallocated


def _index_runs(indices: Iterable[int]) -> Iterator[tuple[int, int]]:
    """Maximal runs [a, b) of consecutive integers in an increasing sequence."""
    run_start = run_end = -1
    for i in indices:
        if i != run_end:
            if run_end > run_start:
                yield run_start, run_end
            run_start = i
        run_end = i + 1
    if run_end > run_start:
        yield run_start, run_end


def _merge_unallocated(extents: list[Extent]) -> list[Extent]:
    out: list[Extent] = []
    for ext in extents:
        prev = out[-1] if out else None
        if prev and prev.status is ext.status is Status.UNALLOCATED:
            out[-1] = Extent(prev.guest_offset, prev.length + ext.length, Status.UNALLOCATED)
        else:
            out.append(ext)
    return out


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
# Walking the chain


def _resolve(layers: list[_Layer], index: int, start: int, end: int, out: list[Run]) -> None:
    """Append the runs for [start, end) as seen from layer `index` downwards."""
    layer = layers[index]
    below = layers[index + 1] if index + 1 < len(layers) else None
    for ext in layer.status(start, end):
        if ext.status is Status.UNALLOCATED:
            _resolve_unallocated(layers, index, below, ext, out)
        elif ext.status is Status.DATA:
            out.extend(layer.data_runs(ext))
        elif ext.status is Status.ZERO:
            out.append(Run(ext.guest_offset, ext.length, layer.depth, True, True, False, ext.host_offset))
        else:  # COMPRESSED: data, but no offset qemu can show
            out.append(Run(ext.guest_offset, ext.length, layer.depth, True, False, True))


def _resolve_unallocated(layers: list[_Layer], index: int, below: _Layer | None,
                         ext: Extent, out: list[Run]) -> None:
    split = ext.guest_offset if below is None else min(ext.end, max(ext.guest_offset, below.size))
    if split > ext.guest_offset:
        _resolve(layers, index + 1, ext.guest_offset, split, out)
    if split < ext.end:
        # No backing, or past the backing's end: zeros, answered by this layer.
        out.append(Run(split, ext.end - split, index, False, True, False))


def mergeable(prev: Run, nxt: Run) -> bool:
    """qemu-img's entry_mergeable (the file is implied by the depth)."""
    if prev.length == 0:
        return False
    if (prev.depth, prev.present, prev.zero, prev.data) != (nxt.depth, nxt.present, nxt.zero, nxt.data):
        return False
    if (prev.offset is None) != (nxt.offset is None):
        return False
    return prev.offset is None or prev.offset + prev.length == nxt.offset


def merge_runs(runs: list[Run]) -> list[Run]:
    """Join adjacent runs the way qemu-img map does."""
    out: list[Run] = []
    for run in runs:
        if out and mergeable(out[-1], run):
            prev = out[-1]
            out[-1] = Run(prev.start, prev.length + run.length, prev.depth, prev.present,
                          prev.zero, prev.data, prev.offset)
        else:
            out.append(run)
    return out


def _entry(run: Run) -> MapEntry:
    entry: MapEntry = {"start": run.start, "length": run.length, "depth": run.depth,
                       "present": run.present, "zero": run.zero, "data": run.data}
    if run.offset is not None:
        entry["offset"] = run.offset
    return entry


# ---------------------------------------------------------------------------
# Human output


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
