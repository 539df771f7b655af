"""The intermediate commit job (QEMU's block-commit below the active layer, block/commit.c).

`create_commit` checks the arguments in QEMU's order with QEMU's messages
(the device must be a root; top and base must be in its chain; the nodes from
top down to base and the overlay of top must not be busy), freezes the links
from top down to base, reopens base read-write, and blocks the device's root,
top, the nodes between, and base.

`run` copies into base, chunk by chunk, every range stored anywhere from top
down to above base (read through top, so the newest copy wins), growing a
raw base that is smaller than top. Guest writes never reach these nodes (they
land in the active node above top), so the copy cannot race with them.

`prepare` drains the graph, replaces top by base in *every* parent top has
now (each overlay of top, whoever put it there), and rewrites those
overlays' headers to name base. On failure or cancel the chain is as it
was; what was already copied into base stays (it is hidden under top).
An active commit (top = the active node) is a mirror with a pivot:
imgchain.jobs.mirror.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imgchain.chain import backing_name_for
from imgchain.errors import ImgchainError
from imgchain.graph import GraphError
from imgchain.node import Node

from .copy import CopyJob, allocated_above, is_zero, sync_outside_drain
from .job import JobError
from .manager import JobManager

if TYPE_CHECKING:
    from .mirror import ActiveCommitJob


class CommitJob(CopyJob):
    job_type = "commit"
    retry_ignored = True  # for commit, "ignore" means retry (QEMU 040)

    def __init__(self, manager: JobManager, root: Node, top: Node, base: Node,
                 backing_file: str | None, **options: Any) -> None:
        super().__init__(manager, **options)
        self.root = root
        self.top = top
        self.base = base
        self.backing_file = backing_file

    # -- the copy ---------------------------------------------------------------

    def source_size(self) -> int:
        return self.top.size

    async def before_copy(self) -> None:
        if self.base.size < self.top.size:
            self.base.driver.grow(self.top.size)  # type: ignore[attr-defined]

    def ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        return allocated_above(self.top, self.base, offset, length)

    def read_node(self) -> Node:
        return self.top

    def target_node(self) -> Node:
        return self.base

    def write_range(self, offset: int, data: memoryview) -> int:
        if is_zero(data):
            self.base.write_zeroes(offset, len(data))
        else:
            self.base.write(offset, data)
        return len(data)

    # -- completion -------------------------------------------------------------------

    async def prepare(self) -> None:
        graph = self.manager.graph
        await sync_outside_drain(self.manager.graph, self.base)
        async with graph.drained():
            self.thaw()
            if self.base not in self.top.chain():
                raise JobError(f"'{self.base.node_name}' is no longer below '{self.top.node_name}'")
            self.base.flush()
            try:
                overlays = graph.replace_node(self.top, self.base)
            except GraphError as exc:
                raise JobError(str(exc)) from None
            for overlay in overlays:
                self._rewrite_header(overlay)

    def _rewrite_header(self, overlay: Node) -> None:
        """Name base in the overlay's header (reopened read-write for it if need be)."""
        name = self.backing_file or backing_name_for(overlay, self.base)
        reopen = not overlay.writable
        graph = self.manager.graph
        try:
            if reopen:
                graph.reopen(overlay, True)
            overlay.driver.change_backing_file(name, self.base.format_name)
        except ImgchainError as exc:
            raise JobError(f"Could not update backing file link: {exc}") from None
        finally:
            if reopen:
                graph.reopen(overlay, False)

    async def abort(self) -> None:
        self.thaw()
        self.base.flush()


def _root_of(manager: JobManager, device: str) -> Node:
    graph = manager.graph
    node = graph.find(device)
    if node is None:
        raise JobError(f"Device '{device}' not found", "DeviceNotFound")
    if graph.backend_of(node) is None and (graph.backends or node.parents):
        # A graph without devices (a chain the CLI opened, not mounted):
        # a node that no overlay uses is a root.
        raise JobError("Need a root block node")
    return node


def _commit_top(graph: Any, root: Node, args: dict[str, Any]) -> Node:
    if "top" in args and "top-node" in args:
        raise JobError("'top-node' and 'top' are mutually exclusive")
    if "top-node" in args:
        top = graph.find_node(args["top-node"])
        if top not in root.chain():
            raise JobError(f"'{args['top-node']}' is not in this backing file chain")
        return top
    if "top" in args:
        top = root if _same_file(args["top"], root) else graph.find_by_file(root, args["top"])
        if top is None:
            raise JobError(f"Top image file {args['top']} not found")
        return top
    return root


def _commit_base(graph: Any, top: Node, args: dict[str, Any]) -> Node:
    if "base" in args and "base-node" in args:
        raise JobError("'base-node' and 'base' are mutually exclusive")
    if "base-node" in args:
        base = graph.find_node(args["base-node"])
        if base not in top.chain():
            raise JobError(f"'{args['base-node']}' is not in this backing file chain")
        return base
    if "base" in args:
        base = graph.find_by_file(top, args["base"])
        if base is None:
            raise JobError(f"Can't find '{args['base']}' in the backing chain")
        return base
    return top.chain()[-1]


def _same_file(name: str, node: Node) -> bool:
    import os
    try:
        return name == node.filename or os.path.samefile(name, node.filename)
    except OSError:
        return False


async def create_commit(manager: JobManager, args: dict[str, Any]) -> "CommitJob | ActiveCommitJob":
    """QMP block-commit: check everything, then start the job (an active
    commit, imgchain.jobs.mirror, when top is the device's root)."""
    graph = manager.graph
    device = args["device"]
    root = _root_of(manager, device)
    graph.check_not_busy([root])
    top = _commit_top(graph, root, args)
    base = _commit_base(graph, top, args)
    if top is base:
        raise JobError("cannot commit an image into itself")
    chain = top.chain()
    graph.check_not_busy(chain[:chain.index(base) + 1])
    if top is root and graph.backend_of(root) is not None:
        from .mirror import create_active_commit
        return await create_active_commit(manager, root, base, args, chain[:chain.index(base) + 1])
    graph.check_not_busy([p.parent for p in top.parents])
    if base.size < top.size and not hasattr(base.driver, "grow"):
        raise JobError(f"{base.filename}: cannot grow a {base.format_name} base to the size of "
                       f"'{top.filename}' ({top.size} bytes)")
    options = manager.job_options(args, device)
    job = CommitJob(manager, root, top, base, args.get("backing-file"), **options)
    nodes = [root, *chain[:chain.index(base) + 1]]
    return await manager.launch(job, graph.freeze(top, base), base, nodes)  # type: ignore[return-value]
