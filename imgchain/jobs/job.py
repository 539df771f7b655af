"""The job engine: QEMU's job state machine, verbs, pause, cancel, rate limit and error policy.

A `Job` runs as one task (`lifecycle`) of its graph's `AioContext`: `run` copies data and never
changes the graph, pausing at a pause point after every chunk; `prepare` is
the only place that changes the graph (drained, BlockGraph's order); `abort`
undoes what can be undone; `clean` always runs last. The transitions and the
verbs each status accepts are QEMU's tables (job.c JobSTT and JobVerbTable),
kept here as data. Drains pause a job through `drained_begin`/`drained_end`
and wait for it with `wait_quiescent` (a job is busy only inside a chunk).
Events go to the manager (`emit`), which forwards them to QMP clients.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from imgchain.errors import ImgchainError
from imgchain.formats import FormatError

if TYPE_CHECKING:
    from imgchain.node import Node

    from .manager import JobManager

TRANSITIONS: dict[str, frozenset[str]] = {
    "undefined": frozenset({"created"}),
    "created": frozenset({"running", "aborting", "null"}),
    "running": frozenset({"paused", "ready", "waiting", "aborting"}),
    "paused": frozenset({"running"}),
    "ready": frozenset({"standby", "waiting", "aborting"}),
    "standby": frozenset({"ready"}),
    "waiting": frozenset({"pending", "aborting"}),
    "pending": frozenset({"aborting", "concluded"}),
    "aborting": frozenset({"aborting", "concluded"}),
    "concluded": frozenset({"null"}),
    "null": frozenset(),
}
_LIVE = frozenset({"created", "running", "paused", "ready", "standby"})
VERBS: dict[str, frozenset[str]] = {
    "cancel": _LIVE | {"waiting", "pending"},
    "pause": _LIVE,
    "resume": _LIVE,
    "set-speed": _LIVE,
    "change": _LIVE,
    "complete": frozenset({"ready", "standby"}),
    "finalize": frozenset({"pending"}),
    "dismiss": frozenset({"concluded"}),
}
SLICE_SECONDS = 0.1  # BLOCK_JOB_SLICE_TIME
ON_ERROR = ("report", "stop", "ignore", "enospc")
IO_ERRORS = (ImgchainError, FormatError, OSError)


class JobError(ImgchainError):
    """A job command was refused (QMP: GenericError unless error_class says otherwise)."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.error_class = error_class


class JobFailed(Exception):
    """The job ends with this error text (BLOCK_JOB_COMPLETED's `error`)."""


def error_text(exc: BaseException) -> str:
    """QEMU reports a job's I/O failure as strerror text."""
    code = getattr(exc, "errno", None)
    return os.strerror(code) if code else str(exc)


def internal_error(job: "Job", exc: Exception) -> str:
    """A job's unexpected exception (a bug): logged with its traceback, and
    the error text the job ends with."""
    import logging  # only on this path: an offline CLI job does not pay for it otherwise
    logging.getLogger("imgchain.jobs").error("job '%s' failed with an internal error", job.id, exc_info=exc)
    return f"internal error: {type(exc).__name__}: {exc}"


class RateLimit:
    """QEMU's ratelimit.h: a quota of bytes per 100 ms slice, 0 = unlimited."""

    def __init__(self, now: Callable[[], float], speed: int = 0) -> None:
        self.now = now
        self.speed = speed
        self.slice_start = self.slice_end = -1.0
        self.dispatched = 0

    def delay(self, n: int) -> float:
        """Account `n` bytes; how long to wait before the next chunk."""
        if not self.speed:
            return 0.0
        quota = max(self.speed * SLICE_SECONDS, 1)
        now = self.now()
        if self.slice_end < now:  # the (possibly extended) slice is over
            self.slice_start, self.slice_end, self.dispatched = now, now + SLICE_SECONDS, 0
        self.dispatched += n
        if self.dispatched < quota:
            return 0.0
        # over the quota: wait in proportion to the excess, then a new slice
        self.slice_end = self.slice_start + self.dispatched / quota * SLICE_SECONDS
        return self.slice_end - now


class Job:
    """One block job; subclasses give `job_type`, `run`, `prepare`, `abort`, `clean`."""

    job_type = "job"

    def __init__(self, manager: "JobManager", job_id: str, speed: int = 0, on_error: str = "report",
                 auto_finalize: bool = True, auto_dismiss: bool = True) -> None:
        self.manager = manager
        self.id = job_id
        self.status = "undefined"
        self.on_error = on_error
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.aio = manager.graph.aio
        self.limit = RateLimit(self.aio.now, speed)
        # Invariant: pause_count > 0 while anything (user, drain, start) wants the job paused;
        # it starts at 1 and the start of `lifecycle` drops it (job_start).
        self.pause_count = 1
        self.user_paused = False
        self.paused = False  # stopped at a pause point right now
        self.cancelled = False  # a cancel was requested (always a force cancel for stream/commit)
        self.finishing = False  # prepare has begun: the graph change is under way, a cancel is too late
        self.busy = False  # inside a chunk: a drain waits for the end of it
        self.io_status = "ok"
        self.offset = 0
        self.length = 0
        self.error: str | None = None
        self.nodes: list["Node"] = []  # nodes the job uses (kept open, blocked)
        self.frozen: list = []  # links it froze: thawed before its graph change, or on abort
        self.target: "Node | None" = None  # the node it writes into
        self.target_read_only_after = False  # a backing, made writable for the job: read-only again at the end
        self.stage = "read"  # the I/O a chunk is doing, for BLOCK_JOB_ERROR's operation
        self._kick = self.aio.event()
        self._not_busy = self.aio.event()
        self._finalize = self.aio.event()
        self.done = self.aio.event()  # concluded (or dismissed)
        self.transition("created")

    # -- state machine ------------------------------------------------------

    def transition(self, to: str) -> None:
        if to not in TRANSITIONS[self.status]:
            raise AssertionError(f"job {self.id}: {self.status} -> {to} is not a transition")
        self.status = to
        self.manager.emit("JOB_STATUS_CHANGE", {"id": self.id, "status": to})

    def check_verb(self, verb: str) -> None:
        if self.status not in VERBS[verb]:
            raise JobError(f"Job '{self.id}' in state '{self.status}' cannot accept command verb '{verb}'")

    # -- drain hooks (BlockGraph.drained) -----------------------------------

    def drained_begin(self) -> None:
        self.pause_count += 1
        self.kick()

    def drained_end(self) -> None:
        self.pause_count -= 1
        self.kick()

    async def wait_quiescent(self) -> None:
        while self.busy:
            await self._not_busy.wait()

    # -- pausing, sleeping --------------------------------------------------

    def kick(self) -> None:
        """Wake the job from a sleep or a pause to look at its state again."""
        self._kick.set()

    async def _wait_kick(self, seconds: float) -> None:
        await self.aio.wait(self._kick, seconds)
        self._kick = self.aio.event()

    async def pause_point(self) -> None:
        """QEMU's job_pause_point: stop here while paused (not when cancelled)."""
        graph = self.manager.graph
        while (self.pause_count > 0 or graph.quiesce_counter > 0) and not self.cancelled:
            if not self.paused:
                self.paused = True
                self.transition("standby" if self.status == "ready" else "paused")
            await self._wait_kick(float("inf"))
        if self.paused:
            self.paused = False
            self.transition("ready" if self.status == "standby" else "running")

    async def sleep(self, seconds: float) -> None:
        """Sleep (woken early by a kick), then a pause point."""
        await self._wait_kick(max(0.0, seconds))
        await self.pause_point()

    async def throttle(self, copied: int) -> None:
        """Account copied bytes; sleep at least once (a yield point) and as
        long as the rate limit asks (re-computed after an early wake-up)."""
        delay = self.limit.delay(copied)
        await self.sleep(delay)
        while not self.cancelled and (delay := self.limit.delay(0)) > 0:
            await self.sleep(delay)

    async def injected(self, node: "Node", op: str, offset: int, length: int) -> None:
        """The fault injection rules (blkdebug) for the job's own I/O."""
        await self.manager.debug.delay(node, op, offset, length, self.aio.sleep)

    def chunk(self) -> "_Chunk":
        """`with job.chunk():` around the I/O of one chunk (drains wait for it)."""
        return _Chunk(self)

    # -- errors -------------------------------------------------------------

    async def io_error(self, exc: BaseException, operation: str) -> str:
        """QEMU's block_job_error_action; returns "retry" or "ignore", raises
        JobFailed for report."""
        code = getattr(exc, "errno", None) or errno.EIO
        action = self.on_error
        if action == "enospc":
            action = "stop" if code == errno.ENOSPC else "report"
        self.manager.emit("BLOCK_JOB_ERROR", {"device": self.id, "operation": operation, "action": action})
        if action == "report":
            raise JobFailed(error_text(exc))
        if action == "ignore":
            return "ignore"
        self.io_status = "nospace" if code == errno.ENOSPC else "failed"
        self.user_paused = True
        self.pause_count += 1
        await self.pause_point()
        return "retry"

    async def retrying(self, operation: Callable[[], Awaitable[Any]]) -> tuple[bool, Any]:
        """Run one chunk's I/O under the error policy: (ok, result); not ok
        means an ignored error (the caller decides) or a cancel. The
        operation sets `stage` ("read" or "write") as it goes."""
        while True:
            try:
                with self.chunk():
                    return True, await operation()
            except IO_ERRORS as exc:
                if await self.io_error(exc, self.stage) == "ignore":
                    return False, exc
                if self.cancelled:
                    return False, exc

    # -- verbs --------------------------------------------------------------

    def pause(self) -> None:
        self.check_verb("pause")
        if self.user_paused:
            raise JobError("Job is already paused")
        self.user_paused = True
        self.pause_count += 1
        self.kick()

    def resume(self) -> None:
        self.check_verb("resume")
        if not self.user_paused:
            raise JobError("Can't resume a job that was not paused")
        self.user_paused = False
        self.pause_count -= 1
        self.io_status = "ok"
        self.kick()

    def set_speed(self, speed: int) -> None:
        self.check_verb("set-speed")
        if speed < 0:
            raise JobError("Parameter 'speed' expects a non-negative value")
        old, self.limit.speed = self.limit.speed, speed
        if not speed or speed > old:
            self.kick()

    def cancel(self, force: bool = False) -> None:
        self.check_verb("cancel")
        if self.finishing:
            return  # as QEMU ignores a cancel once the job has left its run loop and completes
        if self.user_paused and not force:
            raise JobError(f"The block job for device '{self.id}' is currently paused")
        self.cancelled = True
        if self.user_paused:
            self.user_paused = False
            self.pause_count -= 1
        self.kick()
        self._finalize.set()

    def complete(self) -> None:
        self.check_verb("complete")
        raise JobError(f"The active block job '{self.id}' cannot be completed")

    def finalize(self) -> None:
        self.check_verb("finalize")
        self.finishing = True  # accepted: a cancel after this is too late, as in QEMU
        self._finalize.set()

    def dismiss(self) -> None:
        self.check_verb("dismiss")
        self._conclude_to_null()

    # -- lifecycle ------------------------------------------------------------

    def begin(self) -> None:
        """QEMU's job_start: running as soon as the command that made it returns."""
        self.transition("running")
        self.pause_count -= 1

    async def lifecycle(self) -> None:
        """The job's task (after `begin`): run, then finalize or abort, then conclude."""
        failure: str | None = None
        try:
            await self.pause_point()
            if not self.cancelled:
                await self.run()
        except JobFailed as exc:
            failure = str(exc)
        except IO_ERRORS as exc:
            failure = error_text(exc)
        except Exception as exc:  # a bug in one job ends that job, not the daemon and its other jobs
            failure = internal_error(self, exc)
        if failure is None and not self.cancelled:
            self.transition("waiting")
            self.transition("pending")
            failure = await self._finalize_or_cancel()
        if failure is not None or self.cancelled:
            await self._abort(failure)
        self.transition("concluded")
        self.done.set()
        if self.auto_dismiss:
            self._conclude_to_null()

    async def _finalize_or_cancel(self) -> str | None:
        if not self.auto_finalize:
            self.manager.emit("BLOCK_JOB_PENDING", {"type": self.job_type, "id": self.id})
            await self._finalize.wait()
            if self.cancelled:
                return None
        self.finishing = True
        try:
            await self.prepare()
        except (JobFailed, *IO_ERRORS) as exc:
            return str(exc) if isinstance(exc, JobFailed) else error_text(exc)
        except Exception as exc:  # prepare's graph changes are all or nothing: the graph is still whole
            return internal_error(self, exc)
        await self._clean()
        self.cancelled = False
        self.manager.emit("BLOCK_JOB_COMPLETED", self._event_data())
        return None

    async def _abort(self, failure: str | None) -> None:
        self.transition("aborting")
        self.error = failure or ("Operation canceled" if self.cancelled else None)
        try:
            await self.abort()
        except IO_ERRORS as exc:  # its flush of the target failing too: the job ends with it, the daemon goes on
            failure = self.error = failure or error_text(exc)
        finally:
            await self._clean()
        if failure is not None:
            self.manager.emit("BLOCK_JOB_COMPLETED", {**self._event_data(), "error": failure})
        else:
            self.manager.emit("BLOCK_JOB_CANCELLED", self._event_data())

    async def _clean(self) -> None:
        try:
            await self.clean()
        finally:
            await self.manager.detach(self)

    def _conclude_to_null(self) -> None:
        self.transition("null")
        self.manager.forget(self)

    def _event_data(self) -> dict[str, Any]:
        return {"type": self.job_type, "device": self.id, "len": self.length,
                "offset": self.offset, "speed": self.limit.speed}

    # -- what a job type provides ---------------------------------------------

    async def run(self) -> None:
        raise NotImplementedError

    async def prepare(self) -> None:
        """Change the graph (drained); raise to fail the job."""

    async def abort(self) -> None:
        """Undo what can be undone after a failure or cancel."""
        self.thaw()

    async def clean(self) -> None:
        """Release what the job holds, success or not: the target is made
        read-only again if it was a backing when the job started and it is a
        backing still."""
        graph, target = self.manager.graph, self.target
        if target is None or not self.target_read_only_after:
            return

        def still_a_backing() -> bool:  # judged once drained: a pivot may have made it a device's root
            return graph.nodes.get(target.node_name) is target and graph.backend_of(target) is None

        await graph.reopen_drained(target, False, still_a_backing)

    def thaw(self) -> None:
        """Unfreeze the links the job froze (once)."""
        self.manager.graph.unfreeze(self.frozen)
        self.frozen = []

    # -- queries ----------------------------------------------------------------

    def query_block_job(self) -> dict[str, Any]:
        info = {"type": self.job_type, "device": self.id, "len": self.length, "offset": self.offset,
                "busy": self.busy, "paused": self.pause_count > 0, "speed": self.limit.speed,
                "io-status": self.io_status, "ready": self.status in ("ready", "standby"),
                "status": self.status, "auto-finalize": self.auto_finalize,
                "auto-dismiss": self.auto_dismiss}
        if self.error is not None and self.status == "concluded":
            info["error"] = self.error
        return info

    def query_job(self) -> dict[str, Any]:
        info = {"id": self.id, "type": self.job_type, "status": self.status,
                "current-progress": self.offset, "total-progress": self.length}
        if self.error is not None and self.status == "concluded":
            info["error"] = self.error
        return info


class _Chunk:
    """Marks a job busy (in flight) for the duration of one chunk's I/O."""

    def __init__(self, job: Job) -> None:
        self.job = job

    def __enter__(self) -> None:
        self.job.busy = True
        self.job.manager.graph.lock.rdlock()

    def __exit__(self, *exc: object) -> None:
        self.job.manager.graph.lock.rdunlock()
        self.job.busy = False
        self.job._not_busy.set()
        self.job._not_busy = self.job.aio.event()
