"""The block graph of a daemon: nodes, backing links, frozen links, job blockers, drain.

`BlockGraph` owns every node a daemon has open and the devices (`BlockBackend`)
attached to them. Its graph changes are plain synchronous functions that
check everything first and change nothing on failure (QEMU's freeze, replace
and set-backing, with QEMU's messages), so nothing can run between looking a
node up and changing the links. Around every graph change a job runs the same
order (BLOCK-JOBS.md rule R3; the QEMU thread in `seed/` is why):

    async with graph.drained():          # no guest request or job chunk in flight
        node = <look the nodes up now>  # never before the drain
        with graph.lock.write():         # links change, no await inside
            ...
        <rewrite headers>                # synchronous I/O
    # the drain ends: devices drop their cluster maps and go on

`drained()` quiesces the parents of a node (all of the graph by default):
devices hold new requests, jobs pause at their next pause point, and it waits
on events, never a sleep loop, until nothing is in flight. The graph lock is
a reader/writer lock: guest requests and job chunks hold it for reading, a
graph change for writing; nothing awaits (so nothing drains) while it is held
for writing, which is why a writer finding readers is a bug, not a wait.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, AsyncIterator, Callable, Iterator, Protocol

from .aio import AioContext, TrioContext
from .chain import reopen_node, resolve_backing_name
from .errors import ImgchainError
from .node import Child, Node, attach_backing, detach_backing

if TYPE_CHECKING:
    from .backend import BlockBackend


class GraphError(ImgchainError):
    """A graph change was refused (frozen link, busy node); nothing changed."""


class Quiescable(Protocol):
    """A parent that a drain quiesces (a device, a job): QEMU's drained_* hooks."""

    def drained_begin(self) -> None: ...
    def drained_end(self) -> None: ...
    async def wait_quiescent(self) -> None: ...


class GraphLock:
    """Reader/writer lock over the graph's structure (QEMU's graph lock)."""

    def __init__(self) -> None:
        # Invariant: readers counts I/O between its rdlock and rdunlock.
        self.readers = 0
        self.writing = False

    def rdlock(self) -> None:
        assert not self.writing, "a reader ran inside a graph change"
        self.readers += 1

    def rdunlock(self) -> None:
        self.readers -= 1

    @contextmanager
    def write(self) -> Iterator[None]:
        """Held across a synchronous graph change; the caller drained first."""
        if self.readers:
            raise AssertionError(f"graph change with {self.readers} reader(s) in flight: drain first")
        self.writing = True
        try:
            yield
        finally:
            self.writing = False


def _close_all(nodes: list[Node]) -> None:
    for node in nodes:
        node.close()


class BlockGraph:
    """Every node of a daemon, its devices and its jobs' claims on them."""

    def __init__(self, aio: AioContext | None = None) -> None:
        self.aio: AioContext = aio or TrioContext()  # where drains, syncs and jobs wait
        self.nodes: dict[str, Node] = {}
        self.backends: list["BlockBackend"] = []
        self.jobs: list[Quiescable] = []  # jobs that are still attached to nodes
        self.lock = GraphLock()
        self.quiesce_counter = 0
        # Invariant: a node is a key while a worker thread syncs its file (sync_off_loop).
        self._syncing: dict[Node, int] = {}
        self._sync_ended = self.aio.event()
        # Called after every change of links, roots or membership (the daemon
        # rewrites its mount record so `imgchain mounts` shows the chain as it is).
        self.listeners: list[Callable[[], None]] = []
        # While a change is held (`changes_held`), changed() only notes it:
        # the listeners hear of it when the last hold ends (`_told` is set then).
        self._holds = 0
        self._untold = False
        self._told = self.aio.event()

    def changed(self) -> None:
        if self._holds:
            self._untold = True
            return
        for listener in list(self.listeners):
            listener()

    @contextmanager
    def changes_held(self) -> Iterator[None]:
        """The listeners hear of the changes made inside only when it ends: a
        pivot's mount record names the new root once that root is durable,
        not before (a kill -9 between would show a chain missing data)."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            if not self._holds:
                if self._untold:
                    self._untold = False
                    self.changed()
                self._told.set()
                self._told = self.aio.event()

    async def changes_told(self) -> None:
        """Until no change is held: a device's flush returns only then, so
        what it made durable is in the chain the listeners were told of."""
        while self._holds:
            await self._told.wait()

    # -- membership -------------------------------------------------------

    def add_chain(self, top: Node) -> None:
        for node in top.chain():
            self.nodes[node.node_name] = node

    def add_backend(self, backend: "BlockBackend") -> None:
        self.backends.append(backend)
        backend.graph_lock = self.lock
        backend.changes_told = self.changes_told

    def backend_of(self, node: Node) -> "BlockBackend | None":
        return next((b for b in self.backends if b.root is node), None)

    def display_name(self, node: Node) -> str:
        """QEMU's bdrv_get_device_or_node_name: a root shows its device's name."""
        backend = self.backend_of(node)
        return backend.name if backend is not None else node.node_name

    def find(self, name: str) -> Node | None:
        """A node by device name or node name."""
        for backend in self.backends:
            if backend.name == name:
                return backend.root
        return self.nodes.get(name)

    def lookup(self, device: str) -> Node:
        """QEMU's bdrv_lookup_bs: a device or node name, else GraphError."""
        node = self.find(device)
        if node is None:
            raise GraphError(f"Cannot find device='{device}' nor node-name='{device}'")
        return node

    def find_by_file(self, top: Node, filename: str) -> Node | None:
        """The node of `top`'s chain (top excluded) that is the file
        `filename` (QEMU's bdrv_find_backing_image): a relative name is taken
        against the directory of the image above each candidate, as a
        backing name would be, and files are compared by device and inode."""
        chain = top.chain()
        for overlay, node in zip(chain, chain[1:]):
            candidate = filename if os.path.isabs(filename) else resolve_backing_name(overlay.filename, filename)
            try:
                if candidate == node.filename or os.path.samefile(candidate, node.filename):
                    return node
            except OSError:
                continue
        return None

    def find_node(self, name: str) -> Node:
        """A node by node name only (QEMU's bdrv_lookup_bs(NULL, name)), else GraphError."""
        node = self.nodes.get(name)
        if node is None:
            raise GraphError(f"Cannot find device='' nor node-name='{name}'")
        return node

    # -- blockers ---------------------------------------------------------

    def check_not_busy(self, nodes: list[Node]) -> None:
        """The first node in walk order that a job uses fails the request."""
        for node in nodes:
            if node.blockers:
                raise GraphError(f"Node '{self.display_name(node)}' is busy: {node.blockers[0][1]}")

    @staticmethod
    def block(owner: object, nodes: list[Node], reason: str) -> None:
        for node in nodes:
            node.blockers.append((owner, reason))

    @staticmethod
    def unblock(owner: object, nodes: list[Node]) -> None:
        for node in nodes:
            node.blockers = [b for b in node.blockers if b[0] is not owner]

    # -- frozen links -------------------------------------------------------

    @staticmethod
    def _links(top: Node, base: Node | None) -> list[Child]:
        """The links from `top` down to the one that points at `base` (to the end if None)."""
        links: list[Child] = []
        node: Node | None = top
        while node is not None and node is not base and node.backing is not None:
            links.append(node.backing)
            node = node.backing.child
        return links

    def freeze(self, top: Node, base: Node | None) -> list[Child]:
        """QEMU's bdrv_freeze_backing_chain: all or nothing; returns the links."""
        links = self._links(top, base)
        for link in links:
            if link.frozen:
                raise GraphError(f"Cannot change '{link.name}' link from '{link.parent.node_name}' "
                                 f"to '{link.child.node_name}'")
        for link in links:
            link.frozen = True
        return links

    @staticmethod
    def unfreeze(links: list[Child]) -> None:
        for link in links:
            assert link.frozen, "unfreeze of a link that is not frozen"
            link.frozen = False

    # -- changes (synchronous, all or nothing) ------------------------------

    def set_backing(self, parent: Node, child: Node | None) -> None:
        """Point `parent`'s backing link at `child` (None: no backing)."""
        link = parent.backing
        if link is not None and link.frozen:
            raise GraphError(f"Cannot change frozen '{link.name}' link from '{parent.node_name}' "
                             f"to '{link.child.node_name}'")
        with self.lock.write():
            detach_backing(parent)
            if child is not None:
                attach_backing(parent, child)
        self.changed()

    def replace_node(self, old: Node, new: Node) -> list[Node]:
        """QEMU's bdrv_replace_node: every parent of `old` (overlays and
        devices) now points at `new`; returns the overlays re-pointed."""
        for link in old.parents:
            if link.frozen:
                raise GraphError(f"Cannot change '{link.name}' link to '{new.node_name}'")
            if link.parent is new or link.parent in new.chain():
                raise GraphError(f"Should not change '{link.name}' link to '{new.node_name}'")
        overlays = [link.parent for link in old.parents]
        with self.lock.write():
            for parent in overlays:
                detach_backing(parent)
                attach_backing(parent, new)
            for backend in self.backends:
                if backend.root is old:
                    backend.replace_root(new)
        self.changed()
        return overlays

    def reopen(self, node: Node, writable: bool) -> None:
        """QEMU's bdrv_reopen of a node in place, the caller having drained
        and waited for the node's off-loop syncs (wait_syncs): devices forget
        the old file descriptor."""
        assert node not in self._syncing, f"reopen of '{node.node_name}' under a sync of its file"
        reopen_node(node, writable)
        for backend in self.backends:
            backend.reopened()

    # -- syncs off the loop -------------------------------------------------

    async def sync_off_loop(self, node: Node) -> None:
        """fdatasync of `node`'s file in a worker thread while requests go on,
        counted as I/O in flight on the node: a reopen waits for it, since
        closing the descriptor under a running fdatasync keeps the file's
        image locks held until it returns (the reopen's new locks would
        then be refused and the node left without a file)."""
        with self._sync_in_flight(node), self._devices_during_sync():
            await self.aio.run_in_thread(node.sync_file)

    async def write_out_off_loop(self, node: Node) -> None:
        """Start the write-out of `node`'s dirty pages in a worker thread
        (`BlockFile.start_write_out`), counted as a sync in flight on the
        node, as in sync_off_loop: a reopen waits for it."""
        with self._sync_in_flight(node):
            await self.aio.run_in_thread(node.start_write_out)

    @contextmanager
    def _sync_in_flight(self, node: Node) -> Iterator[None]:
        self._syncing[node] = self._syncing.get(node, 0) + 1
        try:
            yield
        finally:
            self._syncing[node] -= 1
            if not self._syncing[node]:
                del self._syncing[node]
            self._sync_ended.set()
            self._sync_ended = self.aio.event()

    async def close_off_loop(self, nodes: list[Node]) -> None:
        """Close nodes that have left the graph in a worker thread: a dropped
        active node's last flush writes back and syncs everything the guest
        wrote into it. Shielded: they are closed whatever happens."""
        with self._devices_during_sync():
            await self.aio.run_in_thread(_close_all, nodes, shield=True)

    @contextmanager
    def _devices_during_sync(self) -> Iterator[None]:
        """While a file of the chain syncs in a worker thread, the devices
        write in place off the loop too (BlockBackend.syncs_running)."""
        for backend in self.backends:
            backend.syncs_running += 1
        try:
            yield
        finally:
            for backend in self.backends:
                backend.syncs_running -= 1

    async def wait_syncs(self, node: Node) -> None:
        """Until no off-loop sync of `node`'s file is running."""
        while node in self._syncing:
            await self._sync_ended.wait()

    async def reopen_drained(self, node: Node, writable: bool,
                             still: Callable[[], bool] = lambda: True) -> bool:
        """Reopen `node` read-write or read-only unless it already is, in a
        drain of its own, looking again once drained (the graph may have
        changed while the drain waited): nothing is done unless `still()`
        holds then. True if it changed."""
        if node.writable == writable:
            return False
        async with self.drained():
            await self.wait_syncs(node)
            if node.writable == writable or not still():
                return False
            self.reopen(node, writable)
        return True

    # -- drain ----------------------------------------------------------------

    def _parents_of(self, node: Node | None) -> tuple[list["BlockBackend"], list[Quiescable]]:
        """The devices and jobs above `node` (all of them for None)."""
        if node is None:
            return list(self.backends), list(self.jobs)
        above: list[Node] = []
        todo = [node]
        while todo:
            n = todo.pop()
            if n not in above:
                above.append(n)
                todo += [link.parent for link in n.parents]
        backends = [b for b in self.backends if b.root in above]
        jobs = [j for j in self.jobs if any(n in above for n in getattr(j, "nodes", ()))]
        return backends, jobs

    @asynccontextmanager
    async def drained(self, node: Node | None = None) -> AsyncIterator[None]:
        """Quiesce the parents of `node` (everything for None): devices hold
        new requests, jobs pause at their next pause point; returns once
        nothing is in flight. Nestable; never entered while the lock is held
        for writing."""
        assert not self.lock.writing, "drain inside a graph change"
        backends, jobs = self._parents_of(node)
        parents: list[Quiescable] = [*backends, *jobs]
        self.quiesce_counter += 1
        for parent in parents:
            parent.drained_begin()
        try:
            for parent in parents:
                await parent.wait_quiescent()
            yield
        finally:
            self.quiesce_counter -= 1
            for parent in parents:
                parent.drained_end()
            for job in self.jobs:  # jobs that started during the drain wait for its end too
                if job not in parents:
                    getattr(job, "kick", lambda: None)()

    # -- node lifetime ------------------------------------------------------

    def referenced(self) -> set[Node]:
        """Nodes a device or a job still uses, with their chains."""
        keep: set[Node] = set()
        for backend in self.backends:
            keep.update(backend.root.chain())
        for job in self.jobs:
            for node in getattr(job, "nodes", ()):
                keep.update(node.chain())
        return keep

    def collect(self) -> list[Node]:
        """Take the nodes nothing uses any more out of the graph and return
        them; the caller closes them (their files stay as they are). Called
        after a job's graph change and clean."""
        keep = self.referenced()
        dropped = [n for n in self.nodes.values() if n not in keep]
        for node in dropped:
            del self.nodes[node.node_name]
            detach_backing(node)
        if dropped:
            self.changed()
        return dropped
