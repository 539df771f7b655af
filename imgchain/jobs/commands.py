"""The QMP commands of block jobs, with QEMU's names, arguments and error classes.

`job_commands(manager)` returns the `Command` records the daemon adds to its
table: block-stream, block-commit, the block-job-* and job-* verbs, and
query-block-jobs / query-jobs. Errors become QMP errors here (JobError keeps
its class: DeviceNotActive for an unknown job, DeviceNotFound for an unknown
device).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from imgchain.qmp import Command, QmpError

from .commit import create_commit
from .job import JobError
from .manager import JobManager
from .snapshot import snapshot_sync
from .stream import create_stream

_JOB_ARGS = {"job-id": ("str", False), "speed": ("int", False), "on-error": ("str", False),
             "auto-finalize": ("bool", False), "auto-dismiss": ("bool", False),
             "filter-node-name": ("str", False)}
STREAM_ARGS = {"device": ("str", True), "base": ("str", False), "base-node": ("str", False),
               "bottom": ("str", False), "backing-file": ("str", False),
               "backing-mask-protocol": ("bool", False), **_JOB_ARGS}
COMMIT_ARGS = {"device": ("str", True), "top": ("str", False), "top-node": ("str", False),
               "base": ("str", False), "base-node": ("str", False), "backing-file": ("str", False),
               "backing-mask-protocol": ("bool", False), **_JOB_ARGS}

SNAPSHOT_ARGS = {"device": ("str", False), "node-name": ("str", False), "snapshot-file": ("str", True),
                 "snapshot-node-name": ("str", False), "format": ("str", False), "mode": ("str", False)}


def _qmp_errors(handler: Callable[[dict[str, Any]], Awaitable[Any]]) -> Callable[[dict[str, Any]], Awaitable[Any]]:
    async def wrapped(args: dict[str, Any]) -> Any:
        try:
            return await handler(args)
        except JobError as exc:
            raise QmpError(str(exc), exc.error_class) from None
    return wrapped


def job_commands(manager: JobManager) -> list[Command]:
    async def block_stream(args: dict[str, Any]) -> dict[str, Any]:
        _no_filter_node(args)
        await create_stream(manager, args)
        return {}

    async def block_commit(args: dict[str, Any]) -> dict[str, Any]:
        _no_filter_node(args)
        await create_commit(manager, args)
        return {}

    def verb(name: str, arg: str, call: Callable[..., None],
             extra: dict[str, tuple[str, bool]] | None = None) -> Command:
        find = manager.get_job if name.startswith("job-") else manager.get

        async def handler(args: dict[str, Any]) -> dict[str, Any]:
            job = find(args[arg])
            call(job, args)
            return {}
        return Command(name, _qmp_errors(handler), {arg: ("str", True), **(extra or {})})

    async def blockdev_snapshot_sync(args: dict[str, Any]) -> dict[str, Any]:
        await snapshot_sync(manager.graph, args)
        return {}

    async def query_block_jobs(args: dict[str, Any]) -> list[dict[str, Any]]:
        return manager.query_block_jobs()

    async def query_jobs(args: dict[str, Any]) -> list[dict[str, Any]]:
        return manager.query_jobs()

    pause = lambda job, args: job.pause()  # noqa: E731 - a table of one-line verbs
    resume = lambda job, args: job.resume()  # noqa: E731
    cancel = lambda job, args: job.cancel(args.get("force", False))  # noqa: E731
    complete = lambda job, args: job.complete()  # noqa: E731
    dismiss = lambda job, args: job.dismiss()  # noqa: E731
    finalize = lambda job, args: job.finalize()  # noqa: E731
    set_speed = lambda job, args: job.set_speed(args["speed"])  # noqa: E731
    force = {"force": ("bool", False)}
    return [
        Command("block-stream", _qmp_errors(block_stream), STREAM_ARGS),
        Command("block-commit", _qmp_errors(block_commit), COMMIT_ARGS),
        verb("block-job-set-speed", "device", set_speed, {"speed": ("int", True)}),
        verb("block-job-pause", "device", pause),
        verb("block-job-resume", "device", resume),
        verb("block-job-cancel", "device", cancel, force),
        verb("block-job-complete", "device", complete),
        verb("block-job-dismiss", "id", dismiss),
        verb("block-job-finalize", "id", finalize),
        verb("job-pause", "id", pause),
        verb("job-resume", "id", resume),
        verb("job-cancel", "id", lambda job, args: job.cancel(True)),
        verb("job-complete", "id", complete),
        verb("job-dismiss", "id", dismiss),
        verb("job-finalize", "id", finalize),
        Command("blockdev-snapshot-sync", _qmp_errors(blockdev_snapshot_sync), SNAPSHOT_ARGS),
        Command("query-block-jobs", query_block_jobs),
        Command("query-jobs", query_jobs),
    ]


def _no_filter_node(args: dict[str, Any]) -> None:
    if "filter-node-name" in args:
        raise JobError("imgchain inserts no filter nodes: 'filter-node-name' is not supported")
