"""The synchronous loop the CLI runs offline jobs on (imgchain.aio.SyncContext).

Its awaits never suspend: it must refuse, loudly, a wait that only another
task could end, and let its poll hook (Ctrl-C, progress) end a sleep early.
"""

from __future__ import annotations

import math
import time

import pytest
import trio

from imgchain.aio import SyncContext, WouldBlock


def test_a_wait_nothing_can_end_is_refused() -> None:
    aio = SyncContext()
    with pytest.raises(WouldBlock):
        SyncContext.run(aio.wait(aio.event(), math.inf))
    with pytest.raises(WouldBlock):
        SyncContext.run(aio.event().wait())


def test_a_set_event_and_a_timeout_end_a_wait() -> None:
    aio = SyncContext()
    event = aio.event()
    event.set()
    SyncContext.run(aio.wait(event, math.inf))
    start = time.monotonic()
    SyncContext.run(aio.wait(aio.event(), 0.12))
    assert time.monotonic() - start >= 0.12


def test_the_poll_hook_runs_during_a_sleep_and_can_end_a_wait() -> None:
    calls: list[float] = []
    event_box = []

    def poll() -> None:
        calls.append(time.monotonic())
        if len(calls) == 3:
            event_box[0].set()  # as a Ctrl-C's cancel kicks the job

    aio = SyncContext(poll)
    event_box.append(aio.event())
    start = time.monotonic()
    SyncContext.run(aio.wait(event_box[0], 30))
    assert len(calls) == 3 and time.monotonic() - start < 5


def test_a_trio_primitive_on_the_synchronous_loop_is_an_error_not_a_hang() -> None:
    async def uses_trio() -> None:
        await trio.sleep(0)

    with pytest.raises(WouldBlock, match="trio primitive"):
        SyncContext.run(uses_trio())


def test_run_returns_the_coroutines_value_and_threads_run_inline() -> None:
    aio = SyncContext()

    async def work() -> int:
        await aio.checkpoint()
        await aio.sleep(0)
        return await aio.run_in_thread(lambda a, b: a + b, 2, 3)

    assert SyncContext.run(work()) == 5
