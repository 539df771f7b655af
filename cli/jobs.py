"""Block job commands: stream, commit, jobs, and the job verbs (pause, resume, cancel, ...).

`stream` and `commit` run the job where the chain is: if IMAGE's file is a
node of a mounted chain (asked of each live mount's daemon, matched by device
and inode), the job runs in that daemon and the command drives it over the
QMP socket (`block-stream` / `block-commit` with node names, then
`query-block-jobs` and the job's events); otherwise it runs in this process
on the same job engine, with the chain opened writable as a mount opens it
(imgchain.jobs.offline). An offline `commit` has `qemu-img commit`'s
semantics: the top is emptied afterwards unless `-d`, and `--base` keeps it.

Attached (no `--detach`), the command shows a progress line on a terminal,
waits for the end, and exits 0 on success and 1 with `imgchain: error: JOB:
ERROR` on failure or cancel. Ctrl-C cancels the job it started (as `virsh
blockpull --wait` does), whether it runs here or in a daemon; the chain stays
as it was. A second Ctrl-C stops waiting for a daemon's job. `imgchain job
wait` only watches: Ctrl-C stops watching and leaves the job running.

`jobs` and `job VERB ID` find jobs in every live mount (`--mount` picks one
when two mounts have jobs with the same id).
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NoReturn

import click

from imgchain.errors import ImgchainError
from imgchain.jobs.job import Job, JobError
from imgchain.jobs.offline import Interrupts, OfflineChain, check_offline_args, final_record
from imgchain.qmp_client import QmpClient, QmpClientError
from imgchain.runtime import MountRecord, live_records

from .common import SIZE, fail, main, notice, output_option, print_json, trust_backing_option, user_errors

POLL_SECONDS = 0.2
EVENT_GRACE_SECONDS = 10.0  # after a job left query-block-jobs, how long its end event may take
QMP_TIMEOUT = 60
ON_ERROR_CHOICE = click.Choice(["report", "stop", "ignore"])


# -- progress -----------------------------------------------------------------

def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ProgressLine:
    """One line on stderr, redrawn in place: bytes done/total, percentage,
    rate over the last seconds, time left. Drawn only on a terminal."""

    WIDTH = 24
    WINDOW = 3.0

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled and sys.stderr.isatty()
        self.samples: deque[tuple[float, int]] = deque()
        self.drawn = False
        self.last_draw = 0.0

    def update(self, done: int, total: int, status: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.WINDOW:
            self.samples.popleft()
        if now - self.last_draw < 0.1:
            return
        self.last_draw = now
        t0, d0 = self.samples[0]
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        frac = done / total if total else 0.0
        bar = "#" * int(frac * self.WIDTH)
        left = f", {_duration((total - done) / rate)} left" if rate > 0 and total > done else ""
        extra = f" [{status}]" if status and status != "running" else ""
        line = (f"{self.label}: [{bar:<{self.WIDTH}}] {human_size(done)} / {human_size(total)} "
                f"({frac:4.0%}), {human_size(rate)}/s{left}{extra}")
        sys.stderr.write("\r" + line + "\x1b[K")
        sys.stderr.flush()
        self.drawn = True

    def finish(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.drawn = False


# -- mounted chains -------------------------------------------------------------

@dataclass
class MountedChain:
    """A live mount whose chain holds IMAGE, with a QMP connection to its daemon."""

    record: MountRecord
    client: QmpClient
    nodes: list[tuple[str, str]] = field(default_factory=list)  # (node name, absolute file), active first

    def close(self) -> None:
        self.client.close()


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _daemon_cwd(record: MountRecord) -> str:
    try:
        return os.readlink(f"/proc/{record.pid}/cwd")
    except OSError:
        return "/"


def _daemon_chain(record: MountRecord, client: QmpClient) -> list[tuple[str, str]]:
    """The mounted chain now (node name, absolute file), active node first."""
    known = {n.get("node-name"): n.get("file") for n in record.nodes}
    cwd = _daemon_cwd(record)
    chain = []
    for node in client.execute("query-named-block-nodes", flat=True):  # O(depth), not O(depth²)
        name, file = node["node-name"], node["file"]
        chain.append((name, known.get(name) or os.path.join(cwd, file)))
    return chain


def through_mountpoint(image: str) -> str:
    """IMAGE, or, where IMAGE is the mount point of a live mount, that
    mount's active image file (so `imgchain stream disk.img` works on the
    mounted disk, instead of treating the FUSE file as a raw image)."""
    real = os.path.realpath(image)
    for record in live_records():
        if os.path.realpath(record.mountpoint) == real and record.image:
            return record.image
    return image


def find_mount(image: str) -> MountedChain | None:
    """The live mount whose chain has IMAGE's file as a node, else None."""
    target = _file_id(image)
    if target is None:
        raise ImgchainError(f"Could not open '{image}': {os.strerror(2)}")
    for record in live_records():
        try:
            client = QmpClient(record.socket, timeout=QMP_TIMEOUT)
        except QmpClientError as exc:
            if any(_file_id(n.get("file", "")) == target for n in record.nodes):
                raise ImgchainError(f"{image} is mounted on {record.mountpoint}, whose daemon "
                                    f"cannot be reached: {exc}") from None
            continue
        try:
            chain = _daemon_chain(record, client)
        except (QmpClientError, OSError, ValueError):
            client.close()
            continue
        if any(_file_id(file) == target for _, file in chain):
            return MountedChain(record, client, chain)
        client.close()
    return None


def _chain_below(nodes: list[tuple[str, str]], image: str) -> list[tuple[str, str]]:
    """IMAGE's own chain within the mounted one: IMAGE's node and those below it."""
    target = _file_id(image)
    for i, (_, file) in enumerate(nodes):
        if _file_id(file) == target:
            return nodes[i:]
    raise ImgchainError(f"'{image}' is not in the mounted chain")


def _mounted_node(chain: list[tuple[str, str]], path: str, image: str) -> str:
    target = _file_id(path)
    if target is None:
        raise ImgchainError(f"Could not open '{path}': {os.strerror(2)}")
    for name, file in chain:
        if _file_id(file) == target:
            return name
    raise ImgchainError(f"'{path}' is not in the backing chain of '{image}'")


# -- following a daemon's job -------------------------------------------------------

def _event_job(event: dict[str, Any]) -> str | None:
    data = event.get("data", {})
    return data.get("device", data.get("id"))


def _record_from_event(event: dict[str, Any]) -> dict[str, Any]:
    data = event["data"]
    record = {"id": data["device"], "type": data["type"], "status": "concluded",
              "current-progress": data["offset"], "total-progress": data["len"]}
    if event["event"] == "BLOCK_JOB_CANCELLED":
        record["error"] = "Operation canceled"
    elif "error" in data:
        record["error"] = data["error"]
    return record


def _take_event(client: QmpClient, job_id: str, names: tuple[str, ...]) -> dict[str, Any] | None:
    for event in client.events:
        if event.get("event") in names and _event_job(event) == job_id:
            client.events.remove(event)
            return event
    return None


def _discard_other_events(client: QmpClient, job_id: str) -> None:
    ends = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_READY")
    client.events[:] = [e for e in client.events if e.get("event") in ends and _event_job(e) == job_id]


def watch_daemon_job(client: QmpClient, job_id: str, progress: ProgressLine, interrupts: Interrupts,
                     *, owned: bool, on_ready: str = "complete") -> dict[str, Any]:
    """Follow a daemon's job to its end; returns its final query-jobs record.

    `owned`: this command started the job, so Ctrl-C cancels it (a second
    Ctrl-C stops waiting); otherwise Ctrl-C stops watching. A job that
    becomes READY (an active commit) is completed (`on_ready` "complete"),
    returned as ready ("return"), or waited for ("wait": until someone
    completes or cancels it)."""
    completing = cancelling = False
    handled = 0
    gone_since: float | None = None
    while True:
        if interrupts.count > handled:
            handled = interrupts.count
            progress.finish()
            if not owned or cancelling:
                notice(f"stopped waiting; job '{job_id}' goes on in the mount's daemon "
                       f"(`imgchain job wait {job_id}`, `imgchain job cancel {job_id}`)")
                sys.exit(1)
            cancelling = True
            notice(f"cancelling job '{job_id}' (Ctrl-C again stops waiting for it)")
            try:
                client.execute("block-job-cancel", device=job_id, force=True)
            except QmpClientError:
                pass  # it ended meanwhile: its end event says how
        jobs = client.execute("query-block-jobs")
        end = _take_event(client, job_id, ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"))
        if end is not None:
            progress.finish()
            return _record_from_event(end)
        mine = next((j for j in jobs if j["device"] == job_id), None)
        if mine is not None and mine["status"] == "concluded":
            progress.finish()
            return _concluded_record(client, job_id)
        ready = _take_event(client, job_id, ("BLOCK_JOB_READY",)) is not None or bool(mine and mine["ready"])
        if ready and not completing and not cancelling and on_ready != "wait":
            if on_ready == "return" and mine is not None:
                progress.finish()
                return {"id": job_id, "type": mine["type"], "status": mine["status"],
                        "current-progress": mine["offset"], "total-progress": mine["len"]}
            client.execute("job-complete", id=job_id)
            completing = True
        _discard_other_events(client, job_id)
        if mine is None:
            # Gone from the list: its end event is on its way (or was missed).
            gone_since = gone_since or time.monotonic()
            if time.monotonic() - gone_since > EVENT_GRACE_SECONDS:
                progress.finish()
                raise ImgchainError(f"{job_id}: the job ended but its result was not reported")
        else:
            progress.update(mine["offset"], mine["len"], mine["status"])
        time.sleep(POLL_SECONDS)


def _concluded_record(client: QmpClient, job_id: str) -> dict[str, Any]:
    for record in client.execute("query-jobs"):
        if record["id"] == job_id:
            return record
    raise ImgchainError(f"Block job '{job_id}' not found")


# -- results ----------------------------------------------------------------------

def finish(record: dict[str, Any], output: str, quiet: bool, success: str | None = None) -> None:
    """Print the final record (json) or a summary, and exit 1 on failure or cancel."""
    if output == "json":
        print_json(record)
    error = record.get("error")
    if error is not None:
        fail(f"{record['id']}: {error}")
    if output != "json" and not quiet:
        done = human_size(record.get("total-progress", 0))
        if record.get("status") in ("ready", "standby"):
            click.echo(f"job '{record['id']}' is ready: `imgchain job complete {record['id']}` pivots")
        else:
            click.echo(success or f"job '{record['id']}' ({record['type']}) completed: {done} processed")


def _usage(message: str) -> NoReturn:
    fail(message, 2)


def _start_on_mount(mounted: MountedChain, command: str, args: dict[str, Any], detach: bool,
                    quiet: bool, output: str, interrupts: Interrupts, on_ready: str = "complete") -> None:
    client = mounted.client
    job_id = args.get("job-id", args["device"])
    client.execute(command, **args)
    if detach:
        record = next((j for j in client.execute("query-jobs") if j["id"] == job_id), None)
        if output == "json":
            print_json({**(record or {"id": job_id}), "mountpoint": mounted.record.mountpoint})
        elif not quiet:
            click.echo(f"job '{job_id}' started in the daemon of {mounted.record.mountpoint} "
                       f"(`imgchain job wait {job_id}`)")
        return
    progress = ProgressLine(f"{command.split('-')[1]} {job_id}", not quiet)
    finish(watch_daemon_job(client, job_id, progress, interrupts, owned=True, on_ready=on_ready), output, quiet)


def _open_offline(image: str, args: dict[str, Any], detach: bool, trust_backing: bool,
                  interrupts: Interrupts) -> OfflineChain:
    """The chain of an image that is not mounted, for a job in this process."""
    if detach:
        _usage(f"--detach needs a mounted chain: '{image}' is not mounted, and the job would end with this command")
    check_offline_args(args)
    return OfflineChain(image, trust_backing, interrupts)


def _run_offline(chain: OfflineChain, kind: str, args: dict[str, Any], quiet: bool, output: str,
                 empty_top: bool = False, success: str | None = None) -> None:
    label = f"{kind} {args.get('job-id', args['device'])}"
    progress = ProgressLine(label, not quiet)

    def show(job: Job) -> None:
        progress.update(job.offset, job.length, job.status)

    try:
        if kind == "stream":
            job = chain.stream(args, show)
        else:
            job = chain.commit(args, empty_top, show)
    finally:
        progress.finish()
    record = final_record(job)
    if chain.interrupted and job.error is not None:
        notice(f"interrupted: job '{job.id}' was cancelled; the chain is as it was")
    finish(record, output, quiet, success if job.error is None else None)


def _common_job_args(speed: int | None, on_error: str | None, job_id: str | None,
                     backing_file: str | None) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if speed is not None:
        args["speed"] = speed
    if on_error is not None:
        args["on-error"] = on_error
    if job_id is not None:
        args["job-id"] = job_id
    if backing_file is not None:
        args["backing-file"] = backing_file
    return args


def job_options(fn: Any) -> Any:
    for option in reversed([
        click.option("--speed", type=SIZE, metavar="RATE", help="Rate limit in bytes per second (K, M, G suffixes; 0: none)."),
        click.option("--on-error", type=ON_ERROR_CHOICE, help="On an I/O error: report (end the job), "
                     "stop (pause it; mounted chains only), ignore (go on, fail at the end). Default: report."),
        click.option("--job-id", metavar="ID", help="The job's id (default: the device or node name)."),
        click.option("--backing-file", metavar="NAME", help="The backing name to write into the header."),
        click.option("--detach", is_flag=True, help="Start the job in the mount's daemon and return."),
        click.option("-q", "--quiet", is_flag=True, help="No progress line, no summary."),
        output_option,
        trust_backing_option,
    ]):
        fn = option(fn)
    return fn


# -- stream and commit ----------------------------------------------------------------

@main.command()
@click.argument("image")
@click.option("--top", "top", metavar="NODE", help="The image to stream into (default IMAGE); a file of IMAGE's chain.")
@click.option("--base", "base", metavar="NODE", help="Stream down to, not including, this image of the chain.")
@click.option("--bottom", "bottom", metavar="NODE", help="Stream down to, and including, this image of the chain.")
@job_options
@user_errors()
def stream(image: str, top: str | None, base: str | None, bottom: str | None, speed: int | None,
           on_error: str | None, job_id: str | None, backing_file: str | None, detach: bool,
           quiet: bool, output: str, trust_backing: bool) -> None:
    """Copy into IMAGE (or --top) the data of its backing chain down to --base
    (or --bottom included; the whole chain with neither), then make the image
    below that point its backing."""
    if base is not None and bottom is not None:
        _usage("--base and --bottom cannot be given together")
    args = _common_job_args(speed, on_error, job_id, backing_file)
    image = through_mountpoint(image)
    with Interrupts() as interrupts:  # from the start: a Ctrl-C while the chain opens cancels the job
        mounted = find_mount(image)
        if mounted is not None:
            try:
                chain = _chain_below(mounted.nodes, image)
                target = _mounted_node(chain, top, image) if top else chain[0][0]
                args["device"] = mounted.record.device if target == mounted.nodes[0][0] else target
                if base is not None:
                    args["base-node"] = _mounted_node(chain, base, image)
                if bottom is not None:
                    args["bottom"] = _mounted_node(chain, bottom, image)
                _start_on_mount(mounted, "block-stream", args, detach, quiet, output, interrupts)
            finally:
                mounted.close()
            return
        offline = _open_offline(image, args, detach, trust_backing, interrupts)
        try:
            args["device"] = offline.node_of(top).node_name if top else offline.top.node_name
            if base is not None:
                args["base-node"] = offline.node_of(base).node_name
            if bottom is not None:
                args["bottom"] = offline.node_of(bottom).node_name
            _run_offline(offline, "stream", args, quiet, output)
        finally:
            offline.close()


@main.command()
@click.argument("image")
@click.option("--top", "top", metavar="NODE", help="The image to commit (default IMAGE); a file of IMAGE's chain.")
@click.option("--base", "base", metavar="NODE", help="The image to commit into (default: the backing of --top).")
@click.option("--no-pivot", is_flag=True, help="Active commit: leave the job ready instead of pivoting.")
@click.option("-d", "--keep-top", is_flag=True, help="Chain not mounted: do not empty the top afterwards.")
@job_options
@user_errors()
def commit(image: str, top: str | None, base: str | None, no_pivot: bool, keep_top: bool,
           speed: int | None, on_error: str | None, job_id: str | None, backing_file: str | None,
           detach: bool, quiet: bool, output: str, trust_backing: bool) -> None:
    """Copy the data of --top (default IMAGE) and of every image down to
    --base (default: the backing of --top) into --base.

    Mounted: the images above --base drop out of the chain (an active commit
    pivots the mount onto --base). Not mounted: qemu-img commit's semantics:
    IMAGE is emptied afterwards unless -d; with --base it is kept."""
    args = _common_job_args(speed, on_error, job_id, backing_file)
    image = through_mountpoint(image)
    with Interrupts() as interrupts:
        mounted = find_mount(image)
        if mounted is not None:
            try:
                chain = _chain_below(mounted.nodes, image)
                names = [name for name, _ in chain]
                top_node = _mounted_node(chain, top, image) if top else names[0]
                if base is not None:
                    base_node = _mounted_node(chain, base, image)
                elif names.index(top_node) + 1 < len(names):
                    base_node = names[names.index(top_node) + 1]
                else:
                    raise ImgchainError(f"{top or image}: Image does not have a backing file")
                args.update({"device": mounted.record.device, "top-node": top_node, "base-node": base_node})
                _start_on_mount(mounted, "block-commit", args, detach, quiet, output, interrupts,
                                on_ready="return" if no_pivot else "complete")
            finally:
                mounted.close()
            return
        offline = _open_offline(image, args, detach, trust_backing, interrupts)
        try:
            top_node = offline.node_of(top) if top else offline.top
            if base is not None:
                base_node = offline.node_of(base)
            elif top_node.backing_node is not None:
                base_node = top_node.backing_node
            else:
                raise ImgchainError(f"{top_node.filename}: Image does not have a backing file")
            if top_node is offline.top and backing_file is not None:
                raise JobError("'backing-file' specified, but 'top' is the active layer")
            args.update({"device": offline.top.node_name, "top-node": top_node.node_name,
                         "base-node": base_node.node_name})
            empty = top_node is offline.top and base is None and not keep_top
            success = None
            if empty:
                success = f"Image committed: {top_node.filename} emptied into {base_node.filename}."
            elif top_node is offline.top:
                success = f"Image committed into {base_node.filename}; {top_node.filename} kept."
            _run_offline(offline, "commit", args, quiet, output, empty_top=empty, success=success)
        finally:
            offline.close()


# -- jobs and the job verbs -------------------------------------------------------------

def _daemon_jobs(client: QmpClient) -> list[dict[str, Any]]:
    """query-jobs records with the block job fields (speed, io-status) of each."""
    block = {j["device"]: j for j in client.execute("query-block-jobs")}
    docs = []
    for job in client.execute("query-jobs"):
        extra = block.get(job["id"], {})
        docs.append({**job, "speed": extra.get("speed", 0), "io-status": extra.get("io-status", "ok")})
    return docs


def _select(mount: str | None) -> list[MountRecord]:
    records = live_records()
    if mount is not None:
        target = os.path.realpath(mount)
        records = [r for r in records if os.path.realpath(r.mountpoint) == target]
        if not records:
            raise ImgchainError(f"{mount}: is not a live imgchain mount")
    return records


def locate_job(job_id: str, mount: str | None) -> tuple[MountRecord, QmpClient]:
    """The mount whose daemon has job `job_id`, with a connection to it."""
    found: list[tuple[MountRecord, QmpClient]] = []
    for record in _select(mount):
        try:
            client = QmpClient(record.socket, timeout=QMP_TIMEOUT)
            ids = [j["id"] for j in client.execute("query-jobs")]
        except (QmpClientError, OSError, ValueError) as exc:
            notice(f"{record.mountpoint}: cannot query its daemon: {exc}")
            continue
        if job_id in ids:
            found.append((record, client))
        else:
            client.close()
    if not found:
        raise JobError(f"Block job '{job_id}' not found")
    if len(found) > 1:
        for _, client in found:
            client.close()
        where = ", ".join(r.mountpoint for r, _ in found)
        raise ImgchainError(f"job '{job_id}' exists in several mounts ({where}): name one with --mount")
    return found[0]


mount_option = click.option("--mount", "mount", metavar="MOUNTPOINT",
                            help="The mount whose job it is (when several have a job with this id).")


@main.command("jobs")
@output_option
@user_errors()
def jobs_command(output: str) -> None:
    """The jobs of every mount: id, type, status, progress, speed, error."""
    docs = []
    for record in live_records():
        try:
            with QmpClient(record.socket, timeout=QMP_TIMEOUT) as client:
                jobs = _daemon_jobs(client)
        except (QmpClientError, OSError, ValueError) as exc:
            notice(f"{record.mountpoint}: cannot query its daemon: {exc}")
            continue
        docs += [{"mountpoint": record.mountpoint, **job} for job in jobs]
    if output == "json":
        print_json(docs)
        return
    if not docs:
        click.echo("no jobs")
        return
    for d in docs:
        total = d["total-progress"]
        pct = f" ({d['current-progress'] / total:.0%})" if total else ""
        speed = f", speed {human_size(d['speed'])}/s" if d["speed"] else ""
        error = f", error: {d['error']}" if "error" in d else ""
        io = f", io-status {d['io-status']}" if d["io-status"] != "ok" else ""
        click.echo(f"{d['id']}: {d['type']} {d['status']}, {human_size(d['current-progress'])} / "
                   f"{human_size(total)}{pct}{speed}{io}{error}  [{d['mountpoint']}]")


@main.group("job")
def job_group() -> None:
    """Act on a job of a mount: pause, resume, cancel, complete, finalize, dismiss, set-speed, wait."""


def _verb(name: str, qmp: str, help_text: str) -> None:
    @job_group.command(name, help=help_text)
    @mount_option
    @click.argument("job_id", metavar="ID")
    @user_errors()
    def command(mount: str | None, job_id: str) -> None:
        _, client = locate_job(job_id, mount)
        with client:
            client.execute(qmp, id=job_id)


_verb("pause", "job-pause", "Pause job ID at its next pause point.")
_verb("resume", "job-resume", "Resume job ID paused by `job pause` (or stopped by an error).")
_verb("complete", "job-complete", "Complete a ready job ID (an active commit pivots).")
_verb("finalize", "job-finalize", "Finalize job ID waiting in 'pending' (auto-finalize off).")
_verb("dismiss", "job-dismiss", "Dismiss concluded job ID (auto-dismiss off): its id is free again.")


@job_group.command("cancel")
@click.option("--force", is_flag=True, help="Cancel even a paused job; a READY active commit ends CANCELLED "
                                           "(without --force it completes with base in sync, no pivot).")
@mount_option
@click.argument("job_id", metavar="ID")
@user_errors()
def job_cancel(force: bool, mount: str | None, job_id: str) -> None:
    """Cancel job ID: it ends at its next pause point, its chain as it was."""
    _, client = locate_job(job_id, mount)
    with client:
        client.execute("block-job-cancel", device=job_id, force=force)


@job_group.command("set-speed")
@mount_option
@click.argument("job_id", metavar="ID")
@click.argument("rate", type=SIZE)
@user_errors()
def job_set_speed(mount: str | None, job_id: str, rate: int) -> None:
    """Set job ID's rate limit to RATE bytes per second (K, M, G suffixes; 0: none)."""
    _, client = locate_job(job_id, mount)
    with client:
        client.execute("block-job-set-speed", device=job_id, speed=rate)


@job_group.command("wait")
@mount_option
@click.option("-q", "--quiet", is_flag=True, help="No progress line, no summary.")
@output_option
@click.argument("job_id", metavar="ID")
@user_errors()
def job_wait(mount: str | None, quiet: bool, output: str, job_id: str) -> None:
    """Wait for job ID to end, with a progress line on a terminal; exit 0 on
    success, 1 on failure or cancel. Ctrl-C stops waiting (the job goes on)."""
    _, client = locate_job(job_id, mount)
    with client, Interrupts() as interrupts:
        record = watch_daemon_job(client, job_id, ProgressLine(f"job {job_id}", not quiet), interrupts,
                                  owned=False, on_ready="wait")
    finish(record, output, quiet)
