"""The stream job (QEMU's block-stream, block/stream.c): pull data from the backing chain into a node.

`create_stream` checks the arguments in QEMU's order with QEMU's messages,
refuses a node a job uses (the first busy node in walk order), freezes the
links from the top down to `base_overlay` (never the link to the base: the
stream does not own its base), reopens the top read-write if it is a backing
node, and blocks the top and the nodes below it down to the base.

`run` copies into the top what the nodes between it and the base store and
the top does not, chunk by chunk; right before each write it checks again,
with no await in between, that the top still does not store the range, so a
guest write to the same cluster is never overwritten by the older copy.

`prepare` drains the whole graph and only then looks up the new backing: the
node below `above_base` *now* (a commit below may have replaced the base
meanwhile), re-links the top and rewrites its header (name and format;
both cleared for a full stream).
"""

from __future__ import annotations

from typing import Any

from imgchain.chain import backing_name_for
from imgchain.graph import GraphError
from imgchain.node import Node

from .copy import CopyJob, allocated_above, intersect, is_zero, sync_outside_drain, unallocated_in
from .job import JobError
from .manager import JobManager


class StreamJob(CopyJob):
    job_type = "stream"

    def __init__(self, manager: JobManager, top: Node, base: Node | None, above_base: Node,
                 backing_file: str | None, **options: Any) -> None:
        super().__init__(manager, **options)
        self.top = top
        self.base = base
        self.above_base = above_base
        self.backing_file = backing_file

    # -- the copy -------------------------------------------------------------------

    def source_size(self) -> int:
        nothing_between = self.top.backing is None or (self.top is self.above_base and self.base is not None)
        return 0 if nothing_between else self.top.size

    def ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        below = self.top.backing_node
        if self.top is self.above_base and self.base is not None or below is None:
            return []  # nothing between the top and the base
        return intersect(unallocated_in(self.top, offset, length),
                         allocated_above(below, self.base, offset, length))

    def read_node(self) -> Node:
        return self.top.backing_node  # type: ignore[return-value]

    def target_node(self) -> Node:
        return self.top

    def write_range(self, offset: int, data: memoryview) -> int:
        written = 0
        for off, n in unallocated_in(self.top, offset, len(data)):  # again: a guest write may have come
            piece = data[off - offset:off - offset + n]
            if is_zero(piece):
                self.top.write_zeroes(off, n)
            else:
                self.top.write(off, piece)
            written += n
        return written

    # -- completion -------------------------------------------------------------

    async def prepare(self) -> None:
        graph = self.manager.graph
        await sync_outside_drain(self.manager.graph, self.top)
        async with graph.drained():
            self.thaw()
            if self.top.backing is None:
                return
            new_base = self.above_base.backing_node if self.base is not None else None
            if new_base is self.top.backing_node and self.backing_file is None:
                return  # nothing changes (a stream with nothing between the top and its base)
            try:
                graph.set_backing(self.top, new_base)
            except GraphError as exc:
                raise JobError(str(exc)) from None
            name = self.backing_file or (backing_name_for(self.top, new_base) if new_base is not None else None)
            self.top.driver.change_backing_file(name, new_base.format_name if new_base else None)



def _stream_base(graph: Any, top: Node, device: str, args: dict[str, Any]) -> tuple[Node | None, Node]:
    """(base, above_base) from base / base-node / bottom, with QEMU's checks."""
    given = [k for k in ("base", "base-node", "bottom") if k in args]
    if len(given) > 1:
        a, b = sorted(given, key=("base", "bottom", "base-node").index)[:2]
        raise JobError(f"'{a}' and '{b}' cannot be specified at the same time")
    chain = top.chain()
    if "base" in args:
        base = graph.find_by_file(top, args["base"])
        if base is None:
            raise JobError(f"Can't find '{args['base']}' in the backing chain")
    elif "base-node" in args:
        base = graph.find_node(args["base-node"])
        if base not in chain[1:]:
            raise JobError(f"Node '{args['base-node']}' is not a backing image of '{device}'")
    elif "bottom" in args:
        bottom = graph.find_node(args["bottom"])
        if bottom not in chain:
            raise JobError(f"Node '{args['bottom']}' is not in a chain starting from '{device}'")
        return bottom.backing_node, bottom
    else:
        return None, chain[-1]
    return base, chain[chain.index(base) - 1]


async def create_stream(manager: JobManager, args: dict[str, Any]) -> StreamJob:
    """QMP block-stream: check everything, then start the job."""
    graph = manager.graph
    device = args["device"]
    top = graph.lookup(device)
    base, above_base = _stream_base(graph, top, device, args)
    if "backing-file" in args and base is None:
        raise JobError("backing file specified, but streaming the entire chain")
    chain = top.chain()
    walk = chain[:chain.index(base)] if base is not None else chain
    graph.check_not_busy(walk)
    options = manager.job_options(args, device)
    job = StreamJob(manager, top, base, above_base, args.get("backing-file"), **options)
    frozen = graph.freeze(top, above_base) if top is not above_base else []
    return await manager.launch(job, frozen, top, walk)  # type: ignore[return-value]
