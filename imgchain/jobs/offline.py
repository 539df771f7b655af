"""Block jobs in the calling process, for a chain that is not mounted (the CLI's offline stream and commit).

`OfflineChain` opens IMAGE's backing chain writable, as a mount would (the
same image locks: IMAGE as the active writer, its backing files as backing
readers), in a `BlockGraph` without a device: nothing but the job writes to
it. `stream` and `commit` start a job with the QMP arguments on the same job
engine a daemon uses, run on a synchronous loop (`imgchain.aio.SyncContext`:
nothing but the job runs here, and the CLI does not pay for importing trio),
report progress to a callback, and turn SIGINT (Ctrl-C) into a cancel of
the job: the job stops at its next pause point and ends with the chain as
it was (a cancel that comes once the job has begun its graph change is too
late, as in QEMU; the job then completes).

`commit` follows `qemu-img commit`: without a base, IMAGE is committed into
its immediate backing and then emptied (`make_empty`, every cluster
unallocated again, the header still naming the same backing) unless
`keep_top`; with a base, everything from IMAGE down to above the base is
merged into it and IMAGE is kept. A top below IMAGE is an intermediate
commit as over QMP: the overlay of the top is re-pointed to the base.

Nothing here prints: the CLI (imgchain.cli.jobs) draws the progress and the
messages.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

from imgchain.aio import SyncContext
from imgchain.blkdebug import BlkDebug
from imgchain.chain import open_backing_chain
from imgchain.errors import ImgchainError
from imgchain.formats.qcow2_tables import ClusterType, classify_l2
from imgchain.graph import BlockGraph
from imgchain.node import Node
from imgchain.qcow2 import Qcow2Driver

from .commit import create_commit
from .job import Job, JobError
from .manager import JobManager
from .stream import create_stream

Progress = Callable[[Job], None]
PROGRESS_INTERVAL = 0.1


class _Holder:
    """Keeps every node of the chain open (and locked) while the CLI runs:
    the graph closes nodes that no device or job uses once a job ends, and
    an offline graph has no device. Drains have nothing to wait for here."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes

    def drained_begin(self) -> None:
        pass

    def drained_end(self) -> None:
        pass

    async def wait_quiescent(self) -> None:
        pass


def _file_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


class Interrupts:
    """Counts SIGINT (Ctrl-C) instead of raising KeyboardInterrupt while it is
    entered, so neither a chain being opened nor a QMP exchange is cut in the
    middle; whoever runs the job looks at `count`. Main thread only."""

    def __init__(self) -> None:
        self.count = 0
        self._old: Any = None
        self._depth = 0  # entered again by whoever runs the job: only the outermost exit restores

    def _handler(self, signum: int, frame: object) -> None:
        self.count += 1

    def __enter__(self) -> "Interrupts":
        if not self._depth:
            self._old = signal.signal(signal.SIGINT, self._handler)
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if not self._depth:
            signal.signal(signal.SIGINT, self._old)


class OfflineChain:
    """IMAGE's chain opened writable in a device-less graph, for one job.

    A Ctrl-C counted by `interrupts` before the job starts cancels it as
    soon as it exists; one during the job cancels it too."""

    def __init__(self, image: str, trust_backing: bool = False, interrupts: Interrupts | None = None) -> None:
        self.image = image
        self.interrupts = interrupts or Interrupts()
        self._job: Job | None = None  # the job running now, for `_poll`
        self._progress: Progress | None = None
        self._next_progress = 0.0
        self.graph = BlockGraph(SyncContext(self._poll))
        self.top = open_backing_chain(image, writable=True, trust_backing=trust_backing)
        self.graph.add_chain(self.top)
        self.graph.jobs.append(_Holder(self.top.chain()))
        self.manager = JobManager(self.graph, BlkDebug.from_environment())

    # -- nodes ------------------------------------------------------------------

    @property
    def interrupted(self) -> bool:
        return self.interrupts.count > 0

    @property
    def chain(self) -> list[Node]:
        return self.top.chain()

    def node_of(self, path: str) -> Node:
        """The node of IMAGE's chain that is the file `path` (same device and inode)."""
        try:
            wanted = _file_id(path)
        except OSError as exc:
            raise ImgchainError(f"{path}: {exc.strerror}") from None
        for node in self.chain:
            try:
                if _file_id(node.filename) == wanted:
                    return node
            except OSError:
                continue
        raise ImgchainError(f"'{path}' is not in the backing chain of '{self.image}'")

    def close(self) -> None:
        """Flush and close every node (releasing the locks)."""
        error: BaseException | None = None
        for node in list(self.graph.nodes.values()):
            try:
                node.close()
            except BaseException as exc:  # close every node even if one fails
                error = error or exc
        if error is not None:
            raise error

    # -- jobs -------------------------------------------------------------------

    def stream(self, args: dict[str, Any], progress: Progress | None = None) -> Job:
        """QMP block-stream's arguments; returns the ended job."""
        return self._run(lambda: create_stream(self.manager, args), progress)

    def commit(self, args: dict[str, Any], empty_top: bool, progress: Progress | None = None) -> Job:
        """QMP block-commit's arguments (`device` is IMAGE's node); with
        `empty_top`, the top is emptied after a successful commit (qemu-img
        commit without -d)."""
        top = self.graph.find(args.get("top-node", args["device"]))
        return self._run(lambda: create_commit(self.manager, args), progress,
                         after=(lambda: make_empty(top)) if empty_top and top is not None else None)

    def _run(self, create: Callable[[], Any], progress: Progress | None,
             after: Callable[[], None] | None = None) -> Job:
        """Create the job and run it to its end in this thread (the graph's
        SyncContext: no event loop, nothing else runs); every pause point
        polls for Ctrl-C and draws the progress."""
        with self.interrupts:
            job = SyncContext.run(create())  # a refusal raises here, before the job runs
            self._job, self._progress = job, progress
            self._poll()
            for started in self.manager.take_pending():
                SyncContext.run(started.lifecycle())
            self._job = None
            if progress is not None:
                progress(job)
            if after is not None and job.error is None:
                after()  # a Ctrl-C now is only noted
        return job

    def _poll(self) -> None:
        """The loop's hook: a Ctrl-C cancels the job; progress every PROGRESS_INTERVAL."""
        job = self._job
        if job is None:
            return
        if self.interrupted and job.status not in ("concluded", "null", "aborting"):
            job.cancel(force=True)
        now = time.monotonic()
        if self._progress is not None and now >= self._next_progress:
            self._next_progress = now + PROGRESS_INTERVAL
            self._progress(job)


def check_offline_args(args: dict[str, Any]) -> None:
    """What a job in the CLI process cannot do."""
    if args.get("on-error") == "stop":
        raise JobError("--on-error stop needs a mounted chain: the stopped job could only be "
                       "resumed over the mount's control socket")


def final_record(job: Job) -> dict[str, Any]:
    """The ended job as query-jobs shows a concluded job."""
    record: dict[str, Any] = {"id": job.id, "type": job.job_type, "status": "concluded",
                              "current-progress": job.offset, "total-progress": job.length}
    if job.error is not None:
        record["error"] = job.error
    return record


def make_empty(node: Node) -> None:
    """qemu-img commit's bdrv_make_empty: every cluster of a qcow2 image
    becomes unallocated again (its L2 entries cleared, its data clusters
    freed once the cleared tables are durable); the header keeps its
    backing, so the image shows its backing's content."""
    drv = node.driver
    if not isinstance(drv, Qcow2Driver):
        raise ImgchainError(f"{node.filename}: a {node.format_name} image cannot be emptied")
    for index in range(len(drv.l1)):
        if drv.l2_table(index)[1] is None:
            continue
        offset, table = drv._l2_for_write(index)
        updates = {i: 0 for i, entry in enumerate(table) if entry}
        if not updates:
            continue
        dropped = [e for e in table if e and classify_l2(e) is not ClusterType.ZERO_PLAIN]
        drv._update_l2(offset, table, updates)
        drv.pending.unlinked.extend(dropped)
    drv.flush()
