"""The daemon's state: the graph of one mounted chain, its block backend, its jobs and its QMP commands.

`Daemon` owns everything a mount's daemon changes: the block graph (the
chain's nodes, opened with QEMU's locks), the `BlockBackend` the export uses,
the job manager, and the QMP command table with QEMU's names and reply
shapes. It knows nothing of FUSE; the process that mounts the export
(imgchain.fuse.daemon) creates it, runs `serve` (QMP, jobs, events) and waits
for `quit_requested`.
"""

from __future__ import annotations

import math
from typing import Any

import trio

from . import __version__
from .backend import BlockBackend
from .blkdebug import BlkDebug
from .chain import open_backing_chain
from .graph import BlockGraph
from .jobs.commands import job_commands
from .jobs.manager import JobManager
from .node import Node
from .qmp import Command, QmpServer, greeting

VERSION = tuple(int(p) for p in __version__.split(".")[:3])


class Daemon:
    """One mounted chain and the control protocol over it."""

    def __init__(self, image: str, read_only: bool = False, device: str = "drive0",
                 trust_backing: bool = False) -> None:
        self.image = image
        self.read_only = read_only
        debug = BlkDebug.from_environment()
        self.graph = BlockGraph()
        top = open_backing_chain(image, writable=not read_only, trust_backing=trust_backing)
        self.graph.add_chain(top)
        self.backend = BlockBackend(top, device, debug)
        self.graph.add_backend(self.backend)
        self.jobs = JobManager(self.graph, debug)
        self.quit_requested = trio.Event()
        self.commands = self._command_table()
        self.qmp: QmpServer | None = None
        self._events_in, self._events_out = trio.open_memory_channel[tuple[str, dict[str, Any]]](math.inf)
        self.jobs.listeners.append(lambda name, data: self._events_in.send_nowait((name, data)))

    @property
    def nodes(self) -> list[Node]:
        return self.backend.root.chain()

    def serve_qmp(self, path: str) -> QmpServer:
        self.qmp = QmpServer(path, self.commands, greeting(VERSION, f"imgchain {__version__}"))  # type: ignore[arg-type]
        return self.qmp

    async def serve(self, socket: str, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """QMP on `socket`, the jobs, and their events to QMP clients, until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.serve_qmp(socket).serve)
            await nursery.start(self.jobs.serve)
            nursery.start_soon(self._forward_events)
            task_status.started()

    async def _forward_events(self) -> None:
        async for name, data in self._events_out:
            if self.qmp is not None:
                await self.qmp.emit(name, data)

    # -- commands ---------------------------------------------------------

    def _command_table(self) -> dict[str, Command]:
        table = [
            Command("qmp_capabilities", self.qmp_capabilities, {"enable": ("list", False)}),
            Command("query-version", self.query_version),
            Command("query-commands", self.query_commands),
            Command("query-block", self.query_block),
            Command("query-named-block-nodes", self.query_named_block_nodes, {"flat": ("bool", False)}),
            Command("quit", self.quit),
        ]
        table += job_commands(self.jobs)
        return {c.name: c for c in table}

    async def qmp_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        from .qmp import QmpError
        if args.get("enable"):
            raise QmpError(f"Capability '{args['enable'][0]}' not available")
        return {}

    async def query_version(self, args: dict[str, Any]) -> dict[str, Any]:
        major, minor, micro = VERSION
        return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": f"imgchain {__version__}"}

    async def query_commands(self, args: dict[str, Any]) -> list[dict[str, str]]:
        return [{"name": name} for name in self.commands]

    async def query_block(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        root = self.backend.root
        return [{"device": self.backend.name, "locked": False, "removable": False,
                 "type": "unknown", "inserted": node_summary(root)}]

    async def query_named_block_nodes(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [node_summary(n, args.get("flat", False)) for n in self.nodes]

    async def quit(self, args: dict[str, Any]) -> dict[str, Any]:
        self.quit_requested.set()
        return {}

    def stop_jobs(self) -> None:
        """Before the daemon exits: every live job is cancelled; one that is
        interrupted later still leaves its chain consistent (a job changes
        the graph only in prepare, in one drained step with no await in it;
        a pivot's or a snapshot's syncs after that step only make durable
        what `close` writes back and syncs anyway)."""
        self.jobs.cancel_all()

    # -- teardown ---------------------------------------------------------

    def close(self) -> None:
        """Flush the active image and close every node (releasing the locks;
        each close writes back and syncs its node). Jobs stopped at an await
        leave their chains consistent: they change the graph only in one
        drained step of prepare, with no await in it."""
        try:
            if not self.read_only:
                self.backend.root.flush()
        finally:
            for node in list(self.graph.nodes.values()):
                node.close()


def image_summary(node: Node, flat: bool = False) -> dict[str, Any]:
    """query-named-block-nodes' ImageInfo: filename, format, sizes, and (unless
    `flat`) the nested backing image, built in a loop down the chain as QEMU's
    bdrv_block_device_info does, so a chain of any depth has one."""
    infos = [_image_info(n) for n in ([node] if flat else node.chain())]
    for above, below in zip(infos, infos[1:]):
        above["backing-image"] = below
    return infos[0]


def _image_info(node: Node) -> dict[str, Any]:
    """One node's ImageInfo without its backing image."""
    info: dict[str, Any] = {"filename": node.filename, "format": node.format_name,
                            "virtual-size": node.size, "dirty-flag": False}
    if node.driver.cluster_size:
        info["cluster-size"] = node.driver.cluster_size
    if node.driver.backing_file:
        info["backing-filename"] = node.driver.backing_file
        if node.driver.backing_format:
            info["backing-filename-format"] = node.driver.backing_format
    if node.backing_node is not None:
        info["full-backing-filename"] = node.backing_node.filename
    return info


def node_summary(node: Node, flat: bool = False) -> dict[str, Any]:
    """QEMU's BlockDeviceInfo for one node (`flat`: its image without the backing images)."""
    depth = len(node.chain()) - 1
    summary: dict[str, Any] = {"node-name": node.node_name, "file": node.filename,
                               "drv": node.format_name, "ro": not node.writable,
                               "backing_file_depth": depth, "encrypted": False,
                               "image": image_summary(node, flat)}
    if node.driver.backing_file:
        summary["backing_file"] = node.driver.backing_file
    return summary
