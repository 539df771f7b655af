"""The jobs of one daemon (or one CLI process): ids, tasks, verbs, queries, events.

`JobManager` starts each job as a task in its nursery (`serve`), finds jobs
by id for the verbs (QEMU's messages for unknown and ill-formed ids), and
hands every event to its listeners (the QMP server, a CLI progress view).
It registers a job's claim on nodes with the graph while the job runs, so
drains pause it and finished graph changes do not close nodes it still uses.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from imgchain.blkdebug import BlkDebug
from imgchain.graph import BlockGraph

from .job import ON_ERROR, Job, JobError

if TYPE_CHECKING:
    from imgchain.node import Node

Listener = Callable[[str, dict[str, Any]], None]
_JOB_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


class JobManager:
    def __init__(self, graph: BlockGraph, debug: BlkDebug | None = None) -> None:
        self.graph = graph
        self.debug = debug or BlkDebug([])
        self.jobs: dict[str, Job] = {}
        self.listeners: list[Listener] = []
        self._nursery: Any = None  # serve()'s trio nursery
        self._pending: list[Job] = []  # created before serve() started
        self._launching: set[str] = set()  # ids of jobs between their checks and their start

    # -- tasks --------------------------------------------------------------

    async def serve(self, task_status: Any = None) -> None:
        """Run jobs as trio tasks until cancelled (the daemon's lifetime)."""
        import trio  # only a graph on trio's loop serves; the synchronous loop runs `take_pending`
        task_status = task_status or trio.TASK_STATUS_IGNORED
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for job in self._pending:
                nursery.start_soon(job.lifecycle)
            self._pending.clear()
            task_status.started()
            await trio.sleep(math.inf)

    def start(self, job: Job) -> Job:
        """Register and start a job created by a job type's `create`."""
        self.jobs[job.id] = job
        self.graph.jobs.append(job)
        job.begin()
        if self._nursery is None:
            self._pending.append(job)
        else:
            self._nursery.start_soon(job.lifecycle)
        return job

    def spawn(self, task: Callable[[], Awaitable[None]]) -> bool:
        """Run `task` beside the jobs, on the daemon's loop; False when
        nothing serves (the CLI's synchronous loop runs only its jobs)."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(task)
        return True

    def take_pending(self) -> list[Job]:
        """The jobs started while nothing serves, for a caller that runs
        their `lifecycle` itself (the synchronous loop of the CLI)."""
        pending, self._pending = self._pending, []
        return pending

    async def launch(self, job: Job, frozen: list, target: "Node", nodes: list["Node"]) -> Job:
        """Start a job that has frozen the links `frozen`: `nodes` blocked
        (the reason names the job's type, as QEMU's block_job_create words
        it) and its id taken at once, with no await since the caller's
        checks (a job created while this one's target reopens must find them
        busy, or two jobs would change the same nodes), then its target made
        writable (drained); on failure nothing stays frozen, blocked or
        taken."""
        self._launching.add(job.id)  # taken (no verb reaches the job before it starts)
        self.graph.block(job, nodes, f"block device is in use by block job: {job.job_type}")
        try:
            made_writable = await self.graph.reopen_drained(target, True)
            # A backing is read-only outside a job: it goes back to that at the end, even if it
            # was writable already (a snapshot's old root before the snapshot reopens it)
            job.target_read_only_after = made_writable or bool(target.parents)
        except BaseException:
            self.graph.unblock(job, nodes)
            self.graph.unfreeze(frozen)
            raise
        finally:
            self._launching.discard(job.id)
        job.frozen, job.target, job.nodes = frozen, target, nodes
        return self.start(job)

    async def detach(self, job: Job) -> None:
        """The job no longer uses its nodes: unblock them and close what
        nothing uses any more, in a worker thread (a dropped active node's
        last flush must not hold the loop; nothing else can reach it now)."""
        if job in self.graph.jobs:
            self.graph.jobs.remove(job)
        self.graph.unblock(job, job.nodes)
        dropped = self.graph.collect()
        if dropped:
            await self.graph.close_off_loop(dropped)

    def forget(self, job: Job) -> None:
        """Dismissed (status null): the id is free again."""
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]

    # -- ids and lookup ---------------------------------------------------------

    def new_id(self, job_id: str) -> str:
        if not _JOB_ID.match(job_id):
            raise JobError(f"Invalid job ID '{job_id}'")
        if job_id in self.jobs or job_id in self._launching:
            raise JobError(f"Job ID '{job_id}' already in use")
        return job_id

    def job_options(self, args: dict[str, Any], default_id: str) -> dict[str, Any]:
        """The arguments every job takes (job-id, speed, on-error,
        auto-finalize, auto-dismiss), checked in QEMU's order."""
        job_id = self.new_id(args.get("job-id", default_id))
        speed = args.get("speed", 0)
        if speed < 0:
            raise JobError("Parameter 'speed' expects a non-negative value")
        on_error = args.get("on-error", "report")
        if on_error not in ON_ERROR:
            raise JobError(f"Parameter 'on-error' does not accept value '{on_error}'")
        return {"job_id": job_id, "speed": speed, "on_error": on_error,
                "auto_finalize": args.get("auto-finalize", True),
                "auto_dismiss": args.get("auto-dismiss", True)}

    def get(self, job_id: str) -> Job:
        """A job by id for the block-job-* verbs."""
        job = self.jobs.get(job_id)
        if job is None:
            raise JobError(f"Block job '{job_id}' not found", "DeviceNotActive")
        return job

    def get_job(self, job_id: str) -> Job:
        """A job by id for the generic job-* verbs (QEMU's job-qmp.c)."""
        job = self.jobs.get(job_id)
        if job is None:
            raise JobError("Job not found")
        return job

    async def wait_all_done(self) -> None:
        """Until every job has concluded (after cancel_all, at unmount)."""
        for job in list(self.jobs.values()):
            await job.done.wait()

    def running(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.status != "concluded"]

    # -- events -------------------------------------------------------------------

    def emit(self, name: str, data: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            listener(name, data)

    # -- queries ------------------------------------------------------------------

    def query_block_jobs(self) -> list[dict[str, Any]]:
        return [j.query_block_job() for j in self.jobs.values()]

    def query_jobs(self) -> list[dict[str, Any]]:
        return [j.query_job() for j in self.jobs.values()]

    def cancel_all(self) -> None:
        """Ask every live job to cancel (unmount): each stops at its next
        pause point and ends with its chain as it was."""
        for job in self.jobs.values():
            if job.status not in ("concluded", "null", "aborting"):
                job.cancel(force=True)
