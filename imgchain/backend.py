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
from typing import AsyncIterator, Protocol

import trio

from .blkdebug import BlkDebug
from .node import Node


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
        self._idle = trio.Event()
        self._idle.set()
        self._resumed = trio.Event()
        self._resumed.set()

    # -- requests ---------------------------------------------------------

    async def _wait_resumed(self) -> None:
        while self.quiesce_counter:
            await self._resumed.wait()

    def _begin(self) -> None:
        self.in_flight += 1
        if self.in_flight == 1:
            self._idle = trio.Event()

    def _end(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()

    @asynccontextmanager
    async def _request(self) -> AsyncIterator[Node]:
        await self._wait_resumed()
        self._begin()
        try:
            yield self.root
        finally:
            self._end()

    async def read(self, offset: int, length: int) -> bytes:
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
            return node.read(offset, length)
        finally:
            self._end()

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        """Guest write into the root node (copy-on-write from below)."""
        if self.quiesce_counter:
            await self._wait_resumed()
        node = self.root
        self._begin()
        try:
            if self.debug.rules:
                await self.debug.delay(node, "write", offset, len(data))
            node.write(offset, data)
        finally:
            self._end()

    async def write_zeroes(self, offset: int, length: int) -> None:
        async with self._request() as node:
            await self.debug.delay(node, "write", offset, length)
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
                await self._idle.wait()
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
