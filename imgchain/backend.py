"""The block backend: an export's handle on its root node, with drain.

`BlockBackend` is QEMU's BlockBackend: a named device (`drive0`) attached to
one node (the active image), through which an export issues guest requests.
Every request is counted in flight on the backend while it runs; a request
that arrives while the backend is drained waits (it never fails) until the
drain ends. A drain calls the parent hooks of `BlockDevOps` (QEMU's
BdrvChildClass drained_begin/drained_poll/drained_end) so the export can stop
taking requests, and waits on an event, never a sleep loop, until nothing is
in flight. The data path itself is synchronous (small pread/pwrite inline, as
DESIGN.md measures); only flushes, injected delays and copy-on-write await.

A copy-on-write (a small write into a cluster the root does not hold) is
done as QEMU does it: the root's driver allocates the cluster and marks it
in flight (`Qcow2Driver.begin_allocation`), a worker thread reads the
cluster's old bytes and writes the new cluster while the loop serves other
requests, and only then does the L2 entry point at it. A later write to
that cluster, from the guest or a block job, waits for it first
(`wait_for_allocations`, QEMU's dependent requests); a read meanwhile sees
the old bytes, as the write has not completed. The request stays counted in
flight throughout, so no drain (and no graph change) happens while a
copy-on-write is in flight.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import time
from array import array
from collections import OrderedDict
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable, Protocol

import outcome
import trio

from imgchain.formats import FormatError

from .blkdebug import BlkDebug
from .blockfile import zero_fill
from .errors import ImageIOError
from .extent import Status
from .graph import GraphLock
from .metacache import map_budget
from .node import Node, wait_for_allocations, write_back_off_loop
from .qcow2 import L2Meta, old_bytes_now


# The cluster maps are kept by groups of FILL_CLUSTERS guest clusters, the
# clusters a miss resolves together: one array of 2 * FILL_CLUSTERS int64 per
# group. Slot i (< FILL_CLUSTERS) is where a read of cluster i finds its
# bytes: 0 not resolved, ZERO reads as zeros, UNMAPPABLE neither zeros nor
# one run of data (compressed, split across files), else
# (host offset >> 9) << FD_BITS | (fd + 1). Slot
# FILL_CLUSTERS + i is the host offset in the root's file where a write to
# cluster i lands in place, 0 if unknown. About 1 KiB per group (16 bytes a
# cluster) instead of a few hundred bytes a cluster in dicts of tuples.
GROUP_BITS = 6
FILL_CLUSTERS = 1 << GROUP_BITS
GROUP_MASK = FILL_CLUSTERS - 1
UNMAPPABLE = -1
ZERO = -2
FD_BITS = 20
FD_MASK = (1 << FD_BITS) - 1
_HOST_LIMIT = 1 << (63 - FD_BITS + 9)  # host offsets an entry can hold (4 PiB)
# What a group costs: the array, its key and its ordered-dict slot.
GROUP_BYTES = array("q", bytes(16 * FILL_CLUSTERS)).__sizeof__() + 160


ALLOCATION_TTL = 1.0  # seconds an allocated_file_size answer is reused


class WorkerThreads:
    """A few threads that run blocking calls for trio tasks: one queue put
    and one `run_sync_soon` per call, about half of what trio.to_thread's
    per-call machinery costs the loop. Not cancellable, as
    trio.to_thread.run_sync by default: the call runs to its end and its
    caller gets the outcome. Threads start as calls come, up to `count`."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a forked child has none of the threads

    def _reset(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._started = 0

    async def run(self, fn: Callable[..., object], *args: object) -> object:
        if self._started < self.count:
            self._started += 1
            threading.Thread(target=self._serve, args=(self._queue,), name="imgchain-worker", daemon=True).start()
        self._queue.put((fn, args, trio.lowlevel.current_trio_token(), trio.lowlevel.current_task()))
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    @staticmethod
    def _serve(calls: queue.SimpleQueue) -> None:
        while True:
            fn, args, token, task = calls.get()
            token.run_sync_soon(trio.lowlevel.reschedule, task, outcome.capture(fn, *args))


# Copy-on-write waiting for the disk (BlockBackend._copy_on_write). One
# thread: with four, their GIL hand-offs with the loop cost more than the
# disk reads they overlapped (BENCHMARKS.md, "Copy-on-write off the loop").
WORKERS = WorkerThreads(1)


async def _told() -> None:
    """A device outside any graph: no graph change to wait for."""


def map_entry(fd: int, host: int) -> int:
    """The read slot of a cluster found at `host` in file `fd`."""
    if host & 511 or host >= _HOST_LIMIT or fd >= FD_MASK:
        return UNMAPPABLE
    return (host >> 9) << FD_BITS | (fd + 1)


class BlockDevOps(Protocol):
    """What a device (the FUSE export) implements to hear about drains."""

    def drained_begin(self) -> None:
        """Stop submitting new requests (queue them)."""

    def drained_poll(self) -> bool:
        """True while the device still has requests of its own to finish."""

    def drained_end(self) -> None:
        """Resume submitting requests."""


class BlockBackend:
    """A device attached to a root node; all guest I/O goes through it."""

    def __init__(self, root: Node, name: str = "drive0", debug: BlkDebug | None = None) -> None:
        self.name = name
        self.root = root
        self.debug = debug or BlkDebug([])
        # The graph lock this device's requests hold for reading (the graph's, once added).
        self.graph_lock = GraphLock()
        # Until the graph's listeners know of every graph change (BlockGraph.changes_told).
        self.changes_told: Callable[[], Awaitable[None]] = _told
        self.dev_ops: BlockDevOps | None = None
        # Invariant: in_flight counts requests between their start and end.
        self.in_flight = 0
        # Invariant: quiesce_counter > 0 exactly while some drain is active.
        self.quiesce_counter = 0
        # Invariant: _idle_waiter is set (and dropped) when in_flight drops to 0;
        # it exists only while a drain waits, so requests create no events.
        self._idle_waiter: trio.Event | None = None
        self._resumed = trio.Event()
        self._resumed.set()
        # The cluster maps: group index -> array (see GROUP_BITS above),
        # oldest group first. A read slot says where a read of a guest cluster
        # finds its data, resolved through the chain once; an in-place slot
        # where a write lands with no allocation or copy. Invariant: a slot is
        # cleared before anything can change where that cluster's data lives
        # (a write through this backend, or invalidate_map() around graph
        # changes, which also come before any image file of the chain is
        # closed). Bounded: at most _max_groups groups (the cache-size share
        # of imgchain.metacache), the oldest dropped first.
        self._groups: OrderedDict[int, array] = OrderedDict()
        self._max_groups = max(16, map_budget() // GROUP_BYTES)
        self._map_bits = (root.driver.cluster_size or 65536).bit_length() - 1
        self._map_mask = (1 << self._map_bits) - 1
        # Called with (offset, length) after every guest write has landed
        # (an active commit's dirty bitmap); empty almost always.
        self.write_notifiers: list[Callable[[int, int], None]] = []
        # The device's size: fixed for its life, as a block device's is.
        self.size = root.size
        # The root's file descriptor, for write_now; changes with the root.
        self._root_fd: int = root.driver.file.fd  # type: ignore[attr-defined]
        # The buffer a copy-on-write builds its new cluster in when it runs at once.
        self._cluster = bytearray()
        # allocated_file_size's last answer and when it was taken (monotonic).
        self._allocation = (0, -ALLOCATION_TTL)
        # Invariant: syncs_running counts fdatasyncs of this device's chain
        # running in worker threads (the device's flush, a job's syncs: see
        # BlockGraph.sync_off_loop). While one runs, the file system makes
        # writes wait for its journal (5-15 ms each on ext4), so writes in
        # place go to a worker thread too: one waiting write then does not
        # hold the fifteen behind it (`_write_in_place_off_loop`).
        self.syncs_running = 0
        # Invariant: the writes in place now running in a worker thread; a
        # zeroing (which may free their clusters) waits until there are none.
        self._writes_off_loop = 0
        self._writes_off_loop_done: trio.Event | None = None

    # -- requests ---------------------------------------------------------

    async def _wait_resumed(self) -> None:
        while self.quiesce_counter:
            await self._resumed.wait()

    def _begin(self) -> None:
        self.in_flight += 1
        self.graph_lock.rdlock()

    def _end(self) -> None:
        self.graph_lock.rdunlock()
        self.in_flight -= 1
        if not self.in_flight and self._idle_waiter is not None:
            self._idle_waiter.set()
            self._idle_waiter = None

    @asynccontextmanager
    async def _request(self) -> AsyncIterator[Node]:
        await self._wait_resumed()
        self._begin()
        try:
            yield self.root
        finally:
            self._end()

    # The fast paths: a request inside one cluster whose place is known runs
    # at once, with no coroutine. It needs no in-flight count: it never
    # yields, so no drain can start or end while it runs.

    def read_now(self, offset: int, length: int) -> bytes | None:
        """A read inside one resolved cluster, done now; None when it must go
        through `read` (not resolved yet, drained, fault rules, past the end)."""
        index = offset >> self._map_bits
        group = self._groups.get(index >> GROUP_BITS)
        if (group is None or self.quiesce_counter or self.debug.rules or length <= 0 or offset < 0
                or (offset + length - 1) >> self._map_bits != index or offset + length > self.size):
            return None
        entry = group[index & GROUP_MASK]
        if entry > 0:
            data = os.pread((entry & FD_MASK) - 1, length, (entry >> FD_BITS << 9) + (offset & self._map_mask))
            return data if len(data) == length else None
        return bytes(length) if entry == ZERO else None

    def write_now(self, offset: int, data: bytes | memoryview) -> bool:
        """A write inside one cluster that the root holds in place, or a
        copy-on-write whose old bytes are in memory, done now; False when it
        must go through `write` (also while a sync runs)."""
        at = None if self.syncs_running else self._in_place_at(offset, len(data))
        if at is None:
            return not self.syncs_running and self._copy_on_write_now(offset, data)
        if os.pwrite(self._root_fd, data, at) != len(data):  # short: write it all again
            self.root.driver.file.pwrite(at, data)
        if self.write_notifiers:
            self._notify_write(offset, len(data))
        return True

    def _copy_on_write_now(self, offset: int, data: bytes | memoryview) -> bool:
        """A small write into a cluster the root does not hold, whose old
        bytes the map knows and the page cache has: the new cluster built,
        written and entered with no await (Qcow2Driver.copy_on_write_now).
        False when it must go through `write`."""
        index = offset >> self._map_bits
        group = self._groups.get(index >> GROUP_BITS)
        if (group is None or self.quiesce_counter or self.debug.rules or not data
                or (offset + len(data) - 1) >> self._map_bits != index or offset + len(data) > self.size):
            return False
        entry = group[index & GROUP_MASK]
        driver = self.root.driver
        if not entry or entry == UNMAPPABLE or not driver.cluster_size:
            return False
        if len(self._cluster) != driver.cluster_size:
            self._cluster = bytearray(driver.cluster_size)
        if not old_bytes_now(self._cluster, ((entry & FD_MASK) - 1, entry >> FD_BITS << 9) if entry > 0 else None):
            return False
        if driver.copy_on_write_now(offset, data, self._cluster) is None:
            return False
        self._unmap(index << self._map_bits, 1)
        if self.write_notifiers:
            self._notify_write(offset, len(data))
        self._note_in_place(offset, len(data))
        return True

    def _in_place_at(self, offset: int, length: int) -> int | None:
        """Where in the root's file a write inside one cluster that the root
        holds in place lands (the map knows); None otherwise, or while
        drained, or with fault rules."""
        index = offset >> self._map_bits
        group = self._groups.get(index >> GROUP_BITS)
        if (group is None or self.quiesce_counter or self.debug.rules or not length
                or (offset + length - 1) >> self._map_bits != index or offset + length > self.size):
            return None
        host = group[FILL_CLUSTERS + (index & GROUP_MASK)]
        return host + (offset & self._map_mask) if host else None

    async def _write_in_place_off_loop(self, at: int, data: bytes | memoryview) -> None:
        """A write in place in a worker thread (the caller counts it in
        flight, so no drain, and no reopen of the root, happens meanwhile)."""
        self._writes_off_loop += 1
        try:
            await trio.to_thread.run_sync(self.root.driver.file.pwrite, at, data)  # type: ignore[attr-defined]
        finally:
            self._writes_off_loop -= 1
            if not self._writes_off_loop and self._writes_off_loop_done is not None:
                self._writes_off_loop_done.set()
                self._writes_off_loop_done = None

    async def _wait_writes_off_loop(self) -> None:
        while self._writes_off_loop:
            self._writes_off_loop_done = self._writes_off_loop_done or trio.Event()
            await self._writes_off_loop_done.wait()

    def _notify_write(self, offset: int, length: int) -> None:
        for notify in self.write_notifiers:
            notify(offset, length)

    def _check_offset(self, offset: int) -> None:
        if offset < 0:
            raise ImageIOError(f"{self.name}: read at negative offset {offset}", errno.EINVAL)

    async def read(self, offset: int, length: int) -> bytearray:
        """Guest read; clamped to the virtual size like a block device read."""
        buf = bytearray(max(0, min(length, self.size - max(offset, 0))))
        await self.read_into(offset, memoryview(buf))
        return buf

    async def read_into(self, offset: int, view: memoryview) -> int:
        """Guest read into the caller's buffer (any old content is replaced);
        returns how many bytes the device has there (fewer past its end).
        It awaits only before it starts filling the buffer: once the buffer
        holds this read's bytes, nothing else runs before the caller does."""
        self._check_offset(offset)
        # The hot paths spell out _request: an async context manager costs
        # several microseconds per call, a third of the budget per request.
        if self.quiesce_counter:
            await self._wait_resumed()
        node = self.root
        self._begin()
        try:
            length = max(0, min(len(view), self.size - offset))
            if self.debug.rules:
                await self.debug.delay(node, "read", offset, length, trio.sleep)
            elif length and self._read_into_mapped(offset, view[:length]):
                return length
            node.read_into(offset, view[:length])
            return length
        finally:
            self._end()

    def _lookup(self, index: int) -> int:
        """The read slot of a guest cluster (map_entry), filling the map on a
        miss; UNMAPPABLE when the cluster is not one run of data in one file."""
        group = self._groups.get(index >> GROUP_BITS)
        entry = group[index & GROUP_MASK] if group is not None else 0
        if not entry:
            entry = self._fill_map(index)
        return entry

    def _read_into_mapped(self, offset: int, view: memoryview) -> bool:
        """Fill the buffer through the map: one preadv per run of clusters that
        continue each other in one file, zeros for zero clusters, no block
        status. False (the buffer half filled) when some cluster is neither."""
        bits = self._map_bits
        runs: list[list[int]] = []  # [fd, host offset, length]
        pos, end = offset, offset + len(view)
        while pos < end:
            index = pos >> bits
            entry = self._lookup(index)
            if entry == UNMAPPABLE:
                return False
            n = min(end, (index + 1) << bits) - pos
            fd, host = -1, 0  # zeros
            if entry > 0:
                fd, host = (entry & FD_MASK) - 1, (entry >> FD_BITS << 9) + (pos & self._map_mask)
            if runs and runs[-1][0] == fd and (fd < 0 or runs[-1][1] + runs[-1][2] == host):
                runs[-1][2] += n
            else:
                runs.append([fd, host, n])
            pos += n
        at = 0
        for fd, host, n in runs:
            if fd < 0:
                zero_fill(view[at:at + n])
            elif os.preadv(fd, [view[at:at + n]], host) != n:
                return False  # short (the file ends): the slow path reads zeros there
            at += n
        return True

    def _fill_map(self, index: int) -> int:
        """Resolve the group of FILL_CLUSTERS clusters around `index` in one
        pass through the chain (one block-status call per layer, not one per
        cluster), mapping every cluster that is one run of data or reads as
        zeros and marking the others UNMAPPABLE; returns the read slot of
        `index`. If the group
        holds a corrupt entry, only the cluster asked for is resolved: a read
        of a sound cluster never fails for its neighbour's sake."""
        first = index & -FILL_CLUSTERS
        try:
            self._map_clusters(first, FILL_CLUSTERS)
        except FormatError:
            try:
                self._map_clusters(index, 1)
            except FormatError:
                return UNMAPPABLE  # the read itself takes the slow path and reports it
        return self._group(index >> GROUP_BITS)[index & GROUP_MASK]

    def _group(self, key: int) -> array:
        """The map's group `key`, new (nothing known) if absent; the oldest
        group goes when the map is at its bound."""
        group = self._groups.get(key)
        if group is None:
            while len(self._groups) >= self._max_groups:
                self._groups.popitem(last=False)
            group = self._groups[key] = array("q", bytes(16 * FILL_CLUSTERS))
        return group

    def _map_clusters(self, first: int, count: int) -> None:
        """Resolve `count` clusters from `first`, inside one group (all or
        none: resolution errors propagate before anything is recorded)."""
        bits = self._map_bits
        start = first << bits
        last = min(first + count, -(-self.size >> bits))
        slots = [UNMAPPABLE] * (last - first)
        for guest, length, entry in self.resolve(start, min(count << bits, self.size - start)):
            end = guest + length
            lo = -(-guest >> bits)  # clusters wholly inside the run
            hi = (end >> bits) + (end == self.size and end & self._map_mask != 0)
            if entry == ZERO:
                slots[lo - first:hi - first] = [ZERO] * (hi - lo)
                continue
            fd, base = entry
            for c in range(lo, hi):
                slots[c - first] = map_entry(fd, base + (c << bits))
        group = self._group(first >> GROUP_BITS)
        at = first & GROUP_MASK
        group[at:at + len(slots)] = array("q", slots)

    def resolve(self, offset: int, length: int) -> list[tuple[int, int, object]]:
        """Where the bytes of a guest range live, run by run, walking the
        chain layer by layer (no recursion; one block-status call per layer
        over what still falls through to it): (guest offset, length, (fd,
        host offset - guest offset)) for data in one file, (..., ZERO) for
        what reads as zeros; what is neither (compressed) is left out."""
        found: list[tuple[int, int, object]] = []
        todo = [(offset, offset + length)]  # sorted, disjoint [start, end) ranges
        node: Node | None = self.root
        while todo and node is not None:
            below: list[tuple[int, int]] = []
            fd, size = node.driver.file.fd, node.size  # type: ignore[attr-defined]
            first, last = todo[0][0], min(todo[-1][1], size)
            extents = node.driver.block_status(first, last - first, want_zero=False) if first < last else []
            i = 0
            for start, end in todo:
                while i < len(extents) and extents[i].guest_offset + extents[i].length <= start:
                    i += 1
                j = i
                while j < len(extents) and extents[j].guest_offset < end:
                    ext = extents[j]
                    lo, hi = max(start, ext.guest_offset), min(end, ext.guest_offset + ext.length)
                    if ext.status is Status.DATA:
                        found.append((lo, hi - lo, (fd, ext.host_offset - ext.guest_offset)))
                    elif ext.status is Status.UNALLOCATED:
                        below.append((lo, hi))
                    elif ext.status is Status.ZERO:
                        found.append((lo, hi - lo, ZERO))
                    j += 1
                if end > size:  # past this node's end: zeros
                    found.append((max(start, size), end - max(start, size), ZERO))
            todo, node = below, node.backing_node
        found.extend((start, end - start, ZERO) for start, end in todo)  # nothing below: zeros
        return found

    def _unmap(self, offset: int, length: int) -> None:
        """Forget the clusters of a guest range (before a write moves them)."""
        first, last = offset >> self._map_bits, (offset + max(length, 1) - 1) >> self._map_bits
        if last - first < FILL_CLUSTERS:
            for index in range(first, last + 1):
                group = self._groups.get(index >> GROUP_BITS)
                if group is not None:
                    group[index & GROUP_MASK] = group[FILL_CLUSTERS + (index & GROUP_MASK)] = 0
            return
        lo, hi = first >> GROUP_BITS, last >> GROUP_BITS
        keys = range(lo, hi + 1) if hi - lo < len(self._groups) else [k for k in self._groups if lo <= k <= hi]
        for key in keys:
            self._groups.pop(key, None)

    def invalidate_map(self) -> None:
        """Forget every resolved cluster (call before the chain's layout
        changes, and after a job writes into a node the maps resolve
        through; the end of every drain does it too)."""
        self._groups.clear()
        self._allocation = (0, -ALLOCATION_TTL)

    def allocated_file_size(self) -> int:
        """Bytes the chain's image files take on the host: the sum of their
        allocated blocks (QEMU's bdrv_get_allocated_file_size, over the
        whole chain the device reads through). One fstat per file, at most
        once per ALLOCATION_TTL and again after every graph change."""
        size, taken = self._allocation
        now = time.monotonic()
        if now - taken >= ALLOCATION_TTL:
            size = sum(os.fstat(node.driver.file.fd).st_blocks  # type: ignore[attr-defined]
                       for node in self.root.chain()) * 512
            self._allocation = (size, now)
        return size

    def mapped_clusters(self) -> int:
        """How many clusters the read map knows (mapped, ZERO or UNMAPPABLE)."""
        return sum(FILL_CLUSTERS - group[:FILL_CLUSTERS].count(0) for group in self._groups.values())

    def replace_root(self, node: Node) -> None:
        """Attach the device to another node (the pivot of an active commit,
        a live snapshot): the one place the root changes. Only inside a drain
        and a graph change; every map of the old root is forgotten and the
        maps are rebuilt for the new root's cluster size."""
        assert self.quiesce_counter and not self.in_flight, "replace_root outside a drain"
        self.invalidate_map()
        self.root = node
        self._map_bits = (node.driver.cluster_size or 65536).bit_length() - 1
        self._map_mask = (1 << self._map_bits) - 1
        self._root_fd = node.driver.file.fd  # type: ignore[attr-defined]

    def reopened(self) -> None:
        """A node of the chain was reopened (new file descriptor): forget
        the maps and take the root's descriptor again."""
        self.invalidate_map()
        self._root_fd = self.root.driver.file.fd  # type: ignore[attr-defined]

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        """Guest write into the root node (copy-on-write from below)."""
        if self.quiesce_counter:
            await self._wait_resumed()
        node = self.root
        self._begin()
        try:
            if self.debug.rules:
                await self.debug.delay(node, "write", offset, len(data), trio.sleep)
            elif self.write_now(offset, data):
                return
            elif self.syncs_running and (at := self._in_place_at(offset, len(data))) is not None:
                await self._write_in_place_off_loop(at, data)
                self._notify_write(offset, len(data))
                return
            await wait_for_allocations(node, offset, len(data))
            meta = self._begin_copy_on_write(node, offset, data)
            if meta is not None:
                await self._copy_on_write(node, meta)
            else:
                try:  # nothing else runs before the maps forget what the write moves
                    node.write(offset, data, self._read_below)
                finally:
                    self._unmap(offset, len(data))
            self._notify_write(offset, len(data))
            self._note_in_place(offset, len(data))
        finally:
            self._end()

    def _begin_copy_on_write(self, node: Node, offset: int, data: bytes | memoryview) -> "L2Meta | None":
        """Start a small write into a cluster the root does not hold as an
        allocation in flight, when the cluster's old bytes are one run in one
        file or zeros (the map knows); None: the write goes inline."""
        index = offset >> self._map_bits
        if offset + len(data) > self.size or (offset + len(data) - 1) >> self._map_bits != index:
            return None
        entry = self._lookup(index)
        if entry == UNMAPPABLE:
            return None
        source = ((entry & FD_MASK) - 1, entry >> FD_BITS << 9) if entry > 0 else None
        return node.driver.begin_allocation(offset, data, source)  # type: ignore[return-value]

    async def _copy_on_write(self, node: Node, meta: "L2Meta") -> None:
        """The data half of a copy-on-write, then its L2 entry. At once when
        the cluster's old bytes are in the page cache (no await: nothing
        else runs meanwhile); else, or while a sync of the chain runs, in a
        worker thread while the loop serves other requests, with the cluster
        in flight. On failure (the error goes to this request) the cluster
        is given back and nothing points at it. Waiters wake up either way."""
        driver = node.driver
        try:
            if self.debug.rules:
                meta.done = trio.Event()
                await self.debug.delay(node, "cow", meta.index << self._map_bits,
                                       driver.cluster_size, trio.sleep)  # type: ignore[arg-type]
            if len(self._cluster) != driver.cluster_size:  # type: ignore[attr-defined]
                self._cluster = bytearray(driver.cluster_size)  # type: ignore[arg-type]
            # while a sync runs the file system may hold the write for its journal: then in a
            # thread of its own, as writes in place; else the one worker, unless it can go at once
            syncing = self.syncs_running > 0
            if syncing or not meta.copy_now(driver.file, self._cluster):  # type: ignore[attr-defined]
                meta.done = meta.done or trio.Event()
                run = trio.to_thread.run_sync if syncing else WORKERS.run
                await run(meta.copy, driver.file, driver.cluster_size)  # type: ignore[attr-defined]
        except BaseException:
            driver.abort_allocation(meta)  # type: ignore[attr-defined]
            raise
        else:
            try:
                driver.end_allocation(meta)  # type: ignore[attr-defined]
            finally:
                self._unmap(meta.index << self._map_bits, 1)
        finally:
            if meta.done is not None:
                meta.done.set()  # type: ignore[attr-defined]

    def _read_below(self, offset: int, length: int) -> bytes | bytearray:
        """A copy-on-write's source: the bytes of a range of one cluster that
        the root does not hold, which is what the root shows there now: one
        pread through the map (filled if need be), not a walk down the chain."""
        index = offset >> self._map_bits
        if (offset + length - 1) >> self._map_bits == index and offset + length <= self.size:
            entry = self._lookup(index)
            if entry == ZERO:
                return bytes(length)
            if entry > 0:
                data = os.pread((entry & FD_MASK) - 1, length, (entry >> FD_BITS << 9) + (offset & self._map_mask))
                if len(data) == length:
                    return data
        return self.root.read_below(offset, length)

    def _note_in_place(self, offset: int, length: int) -> None:
        """After a write inside one cluster, remember where it now lives: in
        place in the root's file, for the next write and read of it."""
        index = offset >> self._map_bits
        if length and (offset + length - 1) >> self._map_bits == index:
            host = self.root.driver.in_place_host(index << self._map_bits)
            if host:
                group = self._group(index >> GROUP_BITS)
                slot = index & GROUP_MASK
                group[FILL_CLUSTERS + slot] = host
                group[slot] = map_entry(self._root_fd, host)

    async def write_zeroes(self, offset: int, length: int) -> None:
        async with self._request() as node:
            await self.debug.delay(node, "write", offset, length, trio.sleep)
            while self._writes_off_loop or node.allocation_at(offset, length) is not None:
                await self._wait_writes_off_loop()  # a zeroed cluster may be freed: none may land in it later
                await wait_for_allocations(node, offset, length)
            self._unmap(offset, length)
            node.write_zeroes(offset, length)
            self._notify_write(offset, length)

    async def flush(self) -> None:
        """Make everything written so far durable. The metadata write-back
        runs in steps on the loop (it reads and changes the driver's state);
        its barriers and the final fdatasync, which change nothing in
        memory, go to a worker thread while other requests go on."""
        async with self._request() as node:
            await self.debug.delay(node, "flush", 0, 0, trio.sleep)
            self.syncs_running += 1
            try:
                await write_back_off_loop(node, lambda: trio.to_thread.run_sync(node.sync_file))
            finally:
                self.syncs_running -= 1
        await self.changes_told()  # after a pivot: durable in the chain the mount record names
        if self.root.driver.file.sync_failed:  # type: ignore[attr-defined]
            # the pivot's sync of base failed while this flush waited for it
            raise OSError(errno.EIO, f"{self.root.filename}: an earlier sync failed; data may be lost")

    # -- drain ------------------------------------------------------------

    def drained_begin(self) -> None:
        """Stop new requests (they wait) and tell the device."""
        self.quiesce_counter += 1
        if self.quiesce_counter == 1:
            self._resumed = trio.Event()
            if self.dev_ops is not None:
                self.dev_ops.drained_begin()

    def drained_poll(self) -> bool:
        """True while requests are still in flight."""
        busy_device = self.dev_ops.drained_poll() if self.dev_ops is not None else False
        return self.in_flight > 0 or busy_device

    def drained_end(self) -> None:
        """Let waiting requests run once the last drain ends."""
        assert self.quiesce_counter > 0, "drained_end without drained_begin"
        self.quiesce_counter -= 1
        if self.quiesce_counter == 0:
            self.invalidate_map()  # whatever ran drained may have moved data
            if self.dev_ops is not None:
                self.dev_ops.drained_end()
            self._resumed.set()

    async def wait_quiescent(self) -> None:
        """The drain's wait (BlockGraph.drained): nothing in flight."""
        await self.wait_idle()

    async def wait_idle(self) -> None:
        """Wait until nothing is in flight (event-driven)."""
        while self.drained_poll():
            if self.in_flight:
                if self._idle_waiter is None:
                    self._idle_waiter = trio.Event()
                await self._idle_waiter.wait()
            else:
                await trio.sleep(0)

    @asynccontextmanager
    async def drained(self) -> AsyncIterator[None]:
        """`async with backend.drained():` no guest request runs inside."""
        self.drained_begin()
        try:
            await self.wait_idle()
            yield
        finally:
            self.drained_end()
