"""The block backend: an export's handle on its root node, with drain.

`BlockBackend` is QEMU's BlockBackend: a named device (`drive0`) attached to
one node (the active image), through which an export issues guest requests.
Every request is counted in flight on the backend while it runs; a request
that arrives while the backend is drained waits (it never fails) until the
drain ends. A drain calls the parent hooks of `BlockDevOps` (QEMU's
BdrvChildClass drained_begin/drained_poll/drained_end) so the export can stop
taking requests, and waits on an event, never a sleep loop, until nothing is
in flight. The data path itself is synchronous (small pread/pwrite inline, as
DESIGN.md measures); only flushes and injected delays await.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Protocol

import trio

from .blkdebug import BlkDebug
from .node import Node


MAP_LIMIT = 1 << 20  # resolved clusters kept before the map starts over


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
        # Guest cluster -> (file, host offset) of the data a read of it finds,
        # resolved through the chain once. Invariant: an entry is dropped
        # before anything can change where that cluster's data lives (a write
        # through this backend, or invalidate_map() around graph changes).
        self._map: dict[int, tuple[Any, int]] = {}
        # Guest cluster -> host offset in the root's file where a write to it
        # lands in place (no allocation, no copy). Same invariant as _map.
        self._in_place: dict[int, int] = {}
        self._map_bits = (root.driver.cluster_size or 65536).bit_length() - 1

    # -- requests ---------------------------------------------------------

    async def _wait_resumed(self) -> None:
        while self.quiesce_counter:
            await self._resumed.wait()

    def _begin(self) -> None:
        self.in_flight += 1

    def _end(self) -> None:
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

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        """Guest read; clamped to the virtual size like a block device read."""
        # The hot paths spell out _request: an async context manager costs
        # several microseconds per call, a third of the budget per request.
        if self.quiesce_counter:
            await self._wait_resumed()
        node = self.root
        self._begin()
        try:
            length = max(0, min(length, node.size - offset))
            if self.debug.rules:
                await self.debug.delay(node, "read", offset, length)
            elif length and offset >> self._map_bits == (offset + length - 1) >> self._map_bits:
                hit = self._mapped(offset)
                if hit is not None:
                    return hit[0].pread(hit[1], length)
            return node.read(offset, length)
        finally:
            self._end()

    def _mapped(self, offset: int) -> tuple[Any, int] | None:
        """(file, host offset) for a read inside one cluster, from the map or resolved now."""
        index = offset >> self._map_bits
        start = index << self._map_bits
        hit = self._map.get(index)
        if hit is None:
            hit = self.root.resolve(start, min(1 << self._map_bits, self.root.size - start))
            if hit is None:
                return None
            if len(self._map) >= MAP_LIMIT:
                self._map.clear()
            self._map[index] = hit
        return hit[0], hit[1] + offset - start

    def _unmap(self, offset: int, length: int) -> None:
        first, last = offset >> self._map_bits, (offset + max(length, 1) - 1) >> self._map_bits
        if last - first > 64:
            self.invalidate_map()
        else:
            for index in range(first, last + 1):
                self._map.pop(index, None)
                self._in_place.pop(index, None)

    def invalidate_map(self) -> None:
        """Forget every resolved cluster (call before the chain's layout changes)."""
        self._map.clear()
        self._in_place.clear()

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        """Guest write into the root node (copy-on-write from below)."""
        if self.quiesce_counter:
            await self._wait_resumed()
        node = self.root
        self._begin()
        try:
            if self.debug.rules:
                await self.debug.delay(node, "write", offset, len(data))
            elif self._write_in_place(offset, data):
                return
            self._unmap(offset, len(data))
            node.write(offset, data)
            self._note_in_place(offset, len(data))
        finally:
            self._end()

    def _write_in_place(self, offset: int, data: bytes | memoryview) -> bool:
        """Write a request inside one cluster whose place in the root's file is
        known; False when it is not (the caller takes the full path)."""
        index = offset >> self._map_bits
        host = self._in_place.get(index)
        if host is None or not data or (offset + len(data) - 1) >> self._map_bits != index:
            return False
        if offset + len(data) > self.root.size:
            return False
        self.root.driver.file.pwrite(host + offset - (index << self._map_bits), data)
        return True

    def _note_in_place(self, offset: int, length: int) -> None:
        """After a write inside one cluster, remember where it now lives."""
        index = offset >> self._map_bits
        if length and (offset + length - 1) >> self._map_bits == index:
            host = self.root.driver.in_place_host(index << self._map_bits)
            if host is not None:
                if len(self._in_place) >= MAP_LIMIT:
                    self._in_place.clear()
                self._in_place[index] = host

    async def write_zeroes(self, offset: int, length: int) -> None:
        async with self._request() as node:
            await self.debug.delay(node, "write", offset, length)
            self._unmap(offset, length)
            node.write_zeroes(offset, length)

    async def flush(self) -> None:
        """Make everything written so far durable. Metadata is written back on
        the loop (it reads and changes the driver's state); only the final
        fdatasync, which changes nothing in memory, goes to a worker thread."""
        async with self._request() as node:
            await self.debug.delay(node, "flush", 0, 0)
            node.write_back()
            await trio.to_thread.run_sync(node.sync_file)

    @property
    def size(self) -> int:
        return self.root.size

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
            if self.dev_ops is not None:
                self.dev_ops.drained_end()
            self._resumed.set()

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
