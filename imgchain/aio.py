"""Where the block graph and the job engine wait: trio's loop in a daemon, a synchronous loop in the CLI.

The graph (drain, off-loop syncs) and the job engine (pause points, rate
limit sleeps, events) never call trio themselves: they await through their
graph's `AioContext` (QEMU's name for the event loop a node's I/O runs in).

- `TrioContext` is trio's loop: a daemon (and every test that runs jobs
  next to guest I/O) runs the engine as trio tasks.
- `SyncContext` runs one job to its end in the calling thread with no event
  loop at all: the CLI's job on a chain that is not mounted, where nothing
  else runs beside the job. Its awaits never suspend: a sleep sleeps, a
  thread's work runs inline, a wait on an event that is not set could never
  end (nothing else runs to set it) and is refused as a bug. Every wait
  calls its `poll` hook first, which is how a Ctrl-C becomes a cancel and
  progress gets drawn. It exists because importing trio costs a CLI
  command about 70 ms: `imgchain commit` of a small chain should cost what
  `qemu-img commit` costs.
"""

from __future__ import annotations

import math
import time
from typing import Any, Awaitable, Callable, Coroutine, Protocol, TypeVar

T = TypeVar("T")


class Event(Protocol):
    def set(self) -> None: ...
    def is_set(self) -> bool: ...
    async def wait(self) -> None: ...


class AioContext(Protocol):
    def event(self) -> Event: ...
    def now(self) -> float: ...
    async def sleep(self, seconds: float) -> None: ...
    async def wait(self, event: Event, timeout: float) -> None: ...
    async def checkpoint(self) -> None: ...
    async def run_in_thread(self, fn: Callable[..., T], *args: Any, shield: bool = False) -> T: ...


class TrioContext:
    """trio's event loop (trio is imported when the first one is made)."""

    def __init__(self) -> None:
        import trio
        self._trio = trio

    def event(self) -> Event:
        return self._trio.Event()

    def now(self) -> float:
        return self._trio.current_time()

    async def sleep(self, seconds: float) -> None:
        await self._trio.sleep(seconds)

    async def wait(self, event: Event, timeout: float) -> None:
        """Until `event` is set or `timeout` seconds have passed (a checkpoint either way)."""
        with self._trio.move_on_after(timeout):
            await event.wait()

    async def checkpoint(self) -> None:
        await self._trio.lowlevel.checkpoint()

    async def run_in_thread(self, fn: Callable[..., T], *args: Any, shield: bool = False) -> T:
        """`fn(*args)` in a worker thread while the loop goes on; with
        `shield`, a cancel of the caller does not cut it short."""
        with self._trio.CancelScope(shield=shield):
            return await self._trio.to_thread.run_sync(fn, *args)


class WouldBlock(RuntimeError):
    """The synchronous loop was asked to wait for something only another task could do."""


class SyncEvent:
    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    async def wait(self) -> None:
        if not self._set:
            raise WouldBlock("a wait for an event nothing else can set (no other task runs)")


class SyncContext:
    """The calling thread as the only task; `poll()` runs at every wait and
    at least every `POLL_SECONDS` of a sleep."""

    POLL_SECONDS = 0.05

    def __init__(self, poll: Callable[[], None] = lambda: None) -> None:
        self.poll = poll

    def event(self) -> Event:
        return SyncEvent()

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await self.wait(SyncEvent(), seconds)

    async def wait(self, event: Event, timeout: float) -> None:
        self.poll()
        if event.is_set():
            return
        if math.isinf(timeout):
            await event.wait()  # refused: nothing else could ever set it
        end = time.monotonic() + timeout
        while not event.is_set() and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, self.POLL_SECONDS))
            self.poll()

    async def checkpoint(self) -> None:
        self.poll()

    async def run_in_thread(self, fn: Callable[..., T], *args: Any, shield: bool = False) -> T:
        return fn(*args)  # nothing else runs meanwhile: no thread needed

    @staticmethod
    def run(coro: Coroutine[Any, Any, T] | Awaitable[T]) -> T:
        """Run a coroutine of the engine to its end in this thread."""
        try:
            coro.send(None)  # type: ignore[union-attr]
        except StopIteration as done:
            return done.value
        coro.close()  # type: ignore[union-attr]
        raise WouldBlock("the job engine awaited a trio primitive outside its AioContext")
