"""The copy loop shared by stream and commit: chunks, allocation above a base, progress.

`CopyJob.run` walks the source in chunks; for each it asks the job type which
ranges to copy (`ranges`), reads them (`read_range`) and writes them
(`write_range`) under the job's error policy, then accounts progress (every
processed byte) and the rate limit (copied bytes only) and reaches a pause
point. Reads and writes are synchronous except for injected delays and the
wait for a guest copy-on-write in flight in the range (which comes right
before the write), so a chunk's own check-then-write never interleaves with
a guest request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imgchain.extent import Status
from imgchain.node import wait_for_allocations, write_back_off_loop

from .job import Job, JobFailed, error_text

if TYPE_CHECKING:
    from imgchain.graph import BlockGraph
    from imgchain.node import Node

    from .manager import JobManager

CHUNK = 1 << 20  # bytes per step: large enough to run at disk speed, small enough to pause promptly
WRITE_OUT_STEP = 16 << 20  # bytes a job copies between two early write-outs of its target


def allocated_above(top: "Node", base: "Node | None", offset: int, length: int) -> list[tuple[int, int]]:
    """The ranges of [offset, offset+length) stored in some node from `top`
    down to, not including, `base` (QEMU's bdrv_is_allocated_above: zero
    clusters and raw files count as stored)."""
    pending = [(offset, length)]
    found: list[tuple[int, int]] = []
    node: Node | None = top
    while node is not None and node is not base and pending:
        below: list[tuple[int, int]] = []
        for off, n in pending:
            inside = max(0, min(n, node.size - off))
            for ext in node.driver.block_status(off, inside) if inside else ():
                target = below if ext.status is Status.UNALLOCATED else found
                target.append((ext.guest_offset, ext.length))
            if inside < n:
                below.append((off + inside, n - inside))
        pending, node = below, node.backing_node
    return merge_ranges(found)


def unallocated_in(node: "Node", offset: int, length: int) -> list[tuple[int, int]]:
    """The ranges of [offset, offset+length) that `node` itself does not store."""
    inside = max(0, min(length, node.size - offset))
    return merge_ranges([(e.guest_offset, e.length) for e in node.driver.block_status(offset, inside)
                         if e.status is Status.UNALLOCATED] if inside else [])


def intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for off1, n1 in a:
        for off2, n2 in b:
            lo, hi = max(off1, off2), min(off1 + n1, off2 + n2)
            if lo < hi:
                out.append((lo, hi - lo))
    return merge_ranges(out)


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, n in sorted(ranges):
        if out and out[-1][0] + out[-1][1] >= off:
            last_off, last_n = out[-1]
            out[-1] = (last_off, max(last_n, off + n - last_off))
        elif n:
            out.append((off, n))
    return out


_ZEROS = bytes(CHUNK)

Buffer = bytes | bytearray | memoryview


def is_zero(data: Buffer) -> bool:
    """A memory compare that stops at the first non-zero byte (count() reads
    all; comparing a memoryview item by item is a hundred times slower)."""
    view = memoryview(data)
    return all(_ZEROS.startswith(view[i:i + CHUNK]) for i in range(0, len(view), CHUNK))


class BounceBuffer:
    """A job's one buffer for the data it copies, used again chunk after
    chunk: a copy allocates nothing, and each byte is copied once into it
    and once out of it (a job copies one range at a time)."""

    def __init__(self) -> None:
        self._buffer = bytearray(CHUNK)

    def read(self, node: "Node", offset: int, length: int) -> memoryview:
        """`node`'s guest bytes at offset, in the buffer (valid until the next read)."""
        if length > len(self._buffer):
            self._buffer = bytearray(length)
        view = memoryview(self._buffer)[:length]
        node.read_into(offset, view)
        return view


async def sync_outside_drain(graph: "BlockGraph", node: "Node") -> None:
    """Make what was written into `node` durable before a graph change
    drains, with every fdatasync in a worker thread while the loop serves
    guest I/O: the data first, then the metadata write-back, whose ordering
    barriers then find little left to sync, then once more. The drain after
    it holds guest I/O only for the few writes since. A barrier on the loop
    waits for the file system's journal, and held every guest request for
    10-140 ms during a pivot or a snapshot; the write-back's steps stay in
    order with guests writing between them (`Qcow2Driver.write_back_steps`)."""
    await graph.sync_off_loop(node)
    await write_back_off_loop(node, lambda: graph.sync_off_loop(node))


class EarlyWriteOut:
    """The kernel's write-out of a job's target, started as the job copies:
    every WRITE_OUT_STEP bytes, a task beside the job has a worker thread
    ask the kernel to start writing the target's dirty pages (one at a time;
    `BlockGraph.write_out_off_loop`). A job's copies are synchronous writes
    into the page cache, which the kernel keeps dirty for 30 s, so the
    fdatasync at READY or before the graph change wrote all of them, a
    third of an active commit's time to READY; QEMU's mirror overlaps the
    disk with several copies in flight. Nothing is made durable by it, and
    without a loop to run tasks on (the CLI's offline jobs) it does nothing."""

    def __init__(self, manager: "JobManager", node: "Node") -> None:
        self.manager = manager
        self.node = node
        self._since = 0  # bytes copied since the last write-out started
        self._running = False

    def copied(self, length: int) -> None:
        self._since += length
        if self._since >= WRITE_OUT_STEP and not self._running and self.manager.spawn(self._write_out):
            self._since = 0
            self._running = True

    async def _write_out(self) -> None:
        try:
            await self.manager.graph.write_out_off_loop(self.node)
        finally:
            self._running = False


class CopyJob(Job):
    """A job that copies ranges chunk by chunk (stream, intermediate commit)."""

    retry_ignored = False  # commit: "ignore" means retry the chunk; stream: skip it, fail at the end

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.ignored_error: str | None = None
        self.buffer = BounceBuffer()

    async def run(self) -> None:
        self.length = self.source_size()
        self.write_out = EarlyWriteOut(self.manager, self.target_node())
        await self.before_copy()
        offset = copied = 0
        while offset < self.length:
            await self.throttle(copied)
            if self.cancelled:
                return
            n = min(CHUNK, self.length - offset)
            copied = await self._copy_chunk(offset, n)
            offset += n
            self.offset = offset
        if self.ignored_error is not None:
            raise JobFailed(self.ignored_error)

    async def _copy_chunk(self, offset: int, n: int) -> int:
        copied = 0
        for off, length in self.ranges(offset, n):
            while True:
                ok, result = await self.retrying(lambda: self._copy(off, length))
                if ok:
                    copied += result
                    break
                if self.cancelled:
                    return copied
                if not self.retry_ignored:
                    self.ignored_error = self.ignored_error or error_text(result)
                    break
        return copied

    async def _copy(self, offset: int, length: int) -> int:
        self.stage = "read"
        source = self.read_node()
        await self.injected(source, "read", offset, length)
        data = self.buffer.read(source, offset, length)
        self.stage = "write"
        target = self.target_node()
        await self.injected(target, "write", offset, length)
        await wait_for_allocations(target, offset, length)  # a guest copy-on-write there ends first
        written = self.write_range(offset, data)
        self.write_out.copied(written)
        if written:
            for backend in self.manager.graph.backends:
                backend.invalidate_map()  # a node its maps resolve through has changed
        return written

    # -- what a copying job type provides ---------------------------------------

    def source_size(self) -> int:
        raise NotImplementedError

    async def before_copy(self) -> None:
        """Runs once before the first chunk (commit grows its base)."""

    def ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        raise NotImplementedError

    def read_node(self) -> "Node":
        raise NotImplementedError

    def target_node(self) -> "Node":
        raise NotImplementedError

    def write_range(self, offset: int, data: memoryview) -> int:
        """Write what was read (in the job's buffer); returns the bytes written."""
        raise NotImplementedError
