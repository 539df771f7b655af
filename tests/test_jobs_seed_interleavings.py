"""The interleavings the QEMU thread in seed/ is about, forced deterministically.

Each test holds a guest request in flight with a fault-injection delay (so a
drain has to wait for it) and runs on trio's autojump clock, then lets other
things happen inside that window: a job completing inside another job's
drain, a guest request arriving during a pivot, a snapshot taken while a
stream runs below it, a job cancelled while another prepares. The graph
change of each job must look its nodes up only after its drain, and no
request may fail or see a wrong byte.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from imgchain.backend import BlockBackend
from imgchain.blkdebug import BlkDebug, Rule
from imgchain.chain import open_backing_chain
from imgchain.graph import BlockGraph
from imgchain.jobs import mirror
from imgchain.jobs.commit import create_commit
from imgchain.jobs.copy import allocated_above
from imgchain.jobs.manager import JobManager
from imgchain.jobs.snapshot import snapshot_sync
from imgchain.jobs.stream import create_stream

from .conftest import fdatasync_failing_once, qemu_img, qemu_io
from .test_jobs_concurrent import MIB, build_p9



@pytest.fixture(autouse=True)
def worker_threads_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the autojump clock, a task waiting for a worker thread lets
    simulated time jump to the next deadline (ending a held request early);
    running thread work inline keeps every interleaving here deterministic."""
    async def inline(fn: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(*args)
    monkeypatch.setattr(trio.to_thread, "run_sync", inline)

@pytest.fixture(scope="module")
def p9_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("p9-seed")
    build_p9(directory)
    return directory


class Setup:
    def __init__(self, directory: Path, rules: list[Rule]) -> None:
        self.directory = directory
        self.graph = BlockGraph()
        top = open_backing_chain(str(directory / "img-8.qcow2"), writable=True)
        self.graph.add_chain(top)
        self.debug = BlkDebug(rules)
        self.backend = BlockBackend(top, debug=self.debug)
        self.graph.add_backend(self.backend)
        self.manager = JobManager(self.graph, self.debug)
        self.events: list[tuple[str, dict]] = []
        self.manager.listeners.append(lambda name, data: self.events.append((name, data)))

    def node(self, name: str) -> Any:
        return self.graph.nodes[name]

    def close(self) -> None:
        for node in list(self.graph.nodes.values()):
            node.close()


@pytest.fixture
def chain(p9_template: Path, tmp_path: Path) -> Path:
    for f in p9_template.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def slow_read(offset: int = 0) -> Rule:
    """A guest read of one cluster that stays in flight for 10 s (simulated)."""
    return Rule(image="img-8", op="read", offset=offset, length=512, delay_ms=10_000, once=True)


async def until(predicate: Any) -> None:
    while not predicate():
        await trio.sleep(0.001)


def held_syncs(gates: list[trio.Event]) -> Any:
    """A trio.to_thread.run_sync whose fdatasyncs (`Node.sync_file`) each wait
    for a gate the test sets (appended to `gates`); other thread work runs inline."""
    async def run_sync(fn: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(fn, "__name__", "") == "sync_file":
            gate = trio.Event()
            gates.append(gate)
            await gate.wait()
        return fn(*args)
    return run_sync


async def pivot_with_syncs_held(s: "Setup", nursery: Any, monkeypatch: pytest.MonkeyPatch,
                                gates: list[trio.Event]) -> Any:
    """An active commit of the device into img-6, READY, then completed with
    every fdatasync held (`held_syncs`): returns the job once nothing else can run."""
    await nursery.start(s.manager.serve)
    job = await create_commit(s.manager, {"device": "drive0", "base-node": "img-6"})
    await until(lambda: job.status == "ready")
    monkeypatch.setattr(trio.to_thread, "run_sync", held_syncs(gates))
    job.complete()
    await wait_all_tasks_blocked()
    return job


@pytest.mark.parametrize("repeat", range(12))
async def test_a_job_completes_inside_another_jobs_drain(chain: Path, autojump_clock: Any, repeat: int) -> None:
    """test_overlapping_5's race, forced: the commit's prepare is draining
    (a guest read holds it) when the stream's prepare starts draining too;
    whichever changes the graph first (trio picks the order at random when
    the read ends, hence the repeats), the other looks img-2's replacement
    up only after its own drain, so img-4 ends over img-0."""
    s = Setup(chain, [slow_read()])
    before = bytes(await s.backend.read(1 * MIB, 4096))
    async with trio.open_nursery() as nursery:
        await nursery.start(s.manager.serve)
        commit = await create_commit(s.manager, {"device": "drive0", "top-node": "img-2",
                                                 "base-node": "img-0", "auto-finalize": False})
        stream = await create_stream(s.manager, {"device": "img-4", "bottom": "img-3", "job-id": "img-4",
                                                 "auto-finalize": False})
        await until(lambda: commit.status == "pending" and stream.status == "pending")
        read_result: list[bytes] = []

        async def guest_read() -> None:
            read_result.append(bytes(await s.backend.read(0, 512)))

        nursery.start_soon(guest_read)
        await wait_all_tasks_blocked()
        assert s.backend.in_flight == 1
        commit.finalize()
        await wait_all_tasks_blocked()
        assert s.node("img-3").backing_node.node_name == "img-2"  # the commit waits in its drain
        stream.finalize()
        await wait_all_tasks_blocked()
        assert s.node("img-4").backing_node.node_name == "img-3"  # so does the stream
        await commit.done.wait()
        await stream.done.wait()
        assert read_result and len(read_result[0]) == 512
        nursery.cancel_scope.cancel()
    assert (commit.error, stream.error) == (None, None)
    assert s.node("img-4").backing_node.node_name == "img-0"
    assert "img-2" not in s.graph.nodes
    assert bytes(await s.backend.read(1 * MIB, 4096)) == before
    s.close()


async def test_a_guest_write_arriving_during_the_pivot_waits_and_lands_on_base(chain: Path,
                                                                              autojump_clock: Any) -> None:
    s = Setup(chain, [slow_read(10 * MIB)])  # a range the commit has nothing to copy from
    async with trio.open_nursery() as nursery:
        await nursery.start(s.manager.serve)
        job = await create_commit(s.manager, {"device": "drive0", "base-node": "img-6"})
        await until(lambda: job.status == "ready")
        reads: list[bytes] = []
        nursery.start_soon(lambda: _append_read(s.backend, reads, 10 * MIB))
        await wait_all_tasks_blocked()
        job.complete()
        await wait_all_tasks_blocked()
        assert job.finishing and s.backend.root.node_name == "img-8"  # draining: the read holds it
        written = trio.Event()

        async def guest_write() -> None:
            await s.backend.write(3 * MIB, b"\x5a" * 4096)
            written.set()

        nursery.start_soon(guest_write)
        await wait_all_tasks_blocked()
        assert not written.is_set()  # held while drained, not failed
        await job.done.wait()
        await written.wait()
        assert s.backend.root.node_name == "img-6"
        assert reads and len(reads[0]) == 512
        nursery.cancel_scope.cancel()
    assert job.error is None
    assert bytes(await s.backend.read(3 * MIB, 4096)) == b"\x5a" * 4096
    assert bytes(s.node("img-6").read(3 * MIB, 4096)) == b"\x5a" * 4096  # it landed on the new root
    assert "img-8" not in s.graph.nodes and "img-7" not in s.graph.nodes
    s.close()
    proc = qemu_img("check", chain / "img-6.qcow2")
    assert proc.returncode == 0, proc.stdout


async def _append_read(backend: BlockBackend, out: list[bytes], offset: int = 0) -> None:
    out.append(bytes(await backend.read(offset, 512)))


async def test_a_snapshot_taken_while_a_stream_runs_below_it(chain: Path, autojump_clock: Any) -> None:
    s = Setup(chain, [])
    model = bytearray(await s.backend.read(0, 16 * MIB))
    async with trio.open_nursery() as nursery:
        await nursery.start(s.manager.serve)
        stream = await create_stream(s.manager, {"device": "img-4", "base-node": "img-1", "speed": 1 * MIB})
        await trio.sleep(0.5)
        assert stream.status == "running"
        overlay = await snapshot_sync(s.graph, {"device": "drive0", "snapshot-file": str(chain / "snap.qcow2")})
        assert s.backend.root is overlay and overlay.backing_node.node_name == "img-8"
        await s.backend.write(5 * MIB, b"\x77" * 8192)
        model[5 * MIB:5 * MIB + 8192] = b"\x77" * 8192
        stream.set_speed(0)
        await stream.done.wait()
        nursery.cancel_scope.cancel()
    assert stream.error is None
    assert [n.node_name for n in s.backend.root.chain()] == ["snap", "img-8", "img-7", "img-6", "img-5",
                                                            "img-4", "img-1", "img-0"]
    assert bytes(await s.backend.read(0, 16 * MIB)) == bytes(model)
    assert not s.node("img-8").writable  # a backing now
    s.close()
    for name in ("snap.qcow2", "img-8.qcow2", "img-4.qcow2"):
        proc = qemu_img("check", chain / name)
        assert proc.returncode == 0, proc.stdout


async def test_cancel_of_one_job_while_another_prepares(chain: Path, autojump_clock: Any) -> None:
    s = Setup(chain, [slow_read()])
    async with trio.open_nursery() as nursery:
        await nursery.start(s.manager.serve)
        commit = await create_commit(s.manager, {"device": "drive0", "top-node": "img-2",
                                                 "base-node": "img-0", "auto-finalize": False})
        stream = await create_stream(s.manager, {"device": "img-6", "base-node": "img-4", "speed": 4096})
        await until(lambda: commit.status == "pending")
        nursery.start_soon(lambda: _append_read(s.backend, []))
        await wait_all_tasks_blocked()
        commit.finalize()
        await wait_all_tasks_blocked()
        assert commit.finishing and stream.pause_count > 0  # the drain pauses the stream
        stream.cancel()
        await commit.done.wait()
        await stream.done.wait()
        nursery.cancel_scope.cancel()
    assert commit.error is None and stream.error == "Operation canceled"
    assert [e[0] for e in s.events if e[0].startswith("BLOCK_JOB_")] == ["BLOCK_JOB_PENDING", "BLOCK_JOB_CANCELLED",
                                                                        "BLOCK_JOB_COMPLETED"] \
        or [e[0] for e in s.events if e[0].startswith("BLOCK_JOB_")] == ["BLOCK_JOB_PENDING", "BLOCK_JOB_COMPLETED",
                                                                        "BLOCK_JOB_CANCELLED"]
    assert s.node("img-6").backing_node.node_name == "img-5"  # the cancelled stream changed nothing
    assert s.node("img-3").backing_node.node_name == "img-0"
    s.close()


async def test_guest_requests_are_served_while_the_pivot_copies_a_backlog(chain: Path, autojump_clock: Any) -> None:
    """The copy before the pivot's drain (what the guest dirtied during the
    syncs) yields between chunks: a guest read issued while it runs
    completes before it ends, with the mount still on the old top."""
    s = Setup(chain, [])
    async with trio.open_nursery() as nursery:
        await nursery.start(s.manager.serve)
        job = await create_commit(s.manager, {"device": "drive0", "base-node": "img-6"})
        await until(lambda: job.status == "ready")
        job.pause()
        await until(lambda: job.status == "standby")
        job.dirty.mark(0, 16 * MIB)  # a backlog, as fio's random writes leave during the syncs
        backlog = job.dirty.count
        copy_done = trio.Event()

        async def converge() -> None:
            await job._copy_dirty_down_to(0)
            copy_done.set()

        nursery.start_soon(converge)
        while job.dirty.count == backlog and not copy_done.is_set():
            await trio.lowlevel.checkpoint()  # (simulated time stands still while the copy runs)
        seen: list[int] = []
        data = bytes(await s.backend.read(5 * MIB, 4096))
        seen.append(job.dirty.count)
        await copy_done.wait()
        assert seen[0] > 0, "the read waited for the whole backlog to be copied"
        assert s.backend.root.node_name == "img-8"
        assert bytes(s.node("img-6").read(5 * MIB, 4096)) == data  # the backlog reached base
        job.resume()
        job.complete()
        await job.done.wait()
        nursery.cancel_scope.cancel()
    assert job.error is None and s.backend.root.node_name == "img-6"
    s.close()


async def test_guest_requests_are_served_while_an_active_commit_scans_the_allocation(
        chain: Path, autojump_clock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan that fills the dirty bitmap at the start of an active commit
    yields between slices (the whole device at once held the guest for
    46 ms on a 1 GiB top): a guest read issued as it starts completes
    before the bitmap is whole, and the job still copies everything."""
    monkeypatch.setattr(mirror, "SCAN_SLICE", 64 * 1024)  # a granule: the scan takes many rounds of the loop
    s = Setup(chain, [])
    root = s.backend.root
    expected = bytes(await s.backend.read(0, root.size))
    async with trio.open_nursery() as nursery:
        await nursery.start(s.manager.serve)
        job = await create_commit(s.manager, {"device": "drive0", "base-node": "img-6"})
        total = sum(n for _, n in allocated_above(root, s.node("img-6"), 0, root.size)) // job.dirty.granule
        while not s.backend.write_notifiers:  # the job's task has begun its scan
            await trio.lowlevel.checkpoint()
        await s.backend.read(3 * MIB, 4096)
        marked_when_read = job.dirty.count
        await until(lambda: job.status == "ready")
        job.complete()
        await job.done.wait()
        nursery.cancel_scope.cancel()
    assert 0 < total and marked_when_read < total, (marked_when_read, total)
    assert job.error is None and s.backend.root.node_name == "img-6"
    assert bytes(await s.backend.read(0, root.size)) == expected
    s.close()


async def test_a_bug_in_one_job_ends_that_job_and_the_daemon_goes_on(
        chain: Path, autojump_clock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected exception in a job's run (here a stream's ranges) or
    prepare ends that job with an "internal error" and its chain as it was;
    the job manager, the device and a later job go on."""
    from imgchain.jobs.stream import StreamJob

    s = Setup(chain, [])
    before = bytes(await s.backend.read(0, s.backend.size))
    real_ranges, real_prepare = StreamJob.ranges, StreamJob.prepare

    def broken(self: Any, offset: int, length: int) -> Any:
        if offset >= 2 * MIB:
            raise RuntimeError("boom")
        return real_ranges(self, offset, length)

    async with trio.open_nursery() as nursery:
        await nursery.start(s.manager.serve)
        monkeypatch.setattr(StreamJob, "ranges", broken)
        job = await create_stream(s.manager, {"device": "drive0", "base-node": "img-4"})
        with trio.fail_after(60):
            await job.done.wait()
        assert job.error == "internal error: RuntimeError: boom"
        assert s.backend.root.backing_node is s.node("img-7")  # the chain as it was
        assert bytes(await s.backend.read(0, s.backend.size)) == before
        monkeypatch.setattr(StreamJob, "ranges", real_ranges)

        async def broken_prepare(self: Any) -> None:
            raise AssertionError("a broken invariant")

        monkeypatch.setattr(StreamJob, "prepare", broken_prepare)
        failed = await create_stream(s.manager, {"device": "drive0", "base-node": "img-4"})
        with trio.fail_after(60):
            await failed.done.wait()
        assert failed.error == "internal error: AssertionError: a broken invariant"
        assert s.backend.root.backing_node is s.node("img-7")
        monkeypatch.setattr(StreamJob, "prepare", real_prepare)
        again = await create_stream(s.manager, {"device": "drive0", "base-node": "img-4"})
        with trio.fail_after(60):
            await again.done.wait()
        nursery.cancel_scope.cancel()
    assert again.error is None and s.backend.root.backing_node is s.node("img-4")
    assert bytes(await s.backend.read(0, s.backend.size)) == before
    completed = [d for name, d in s.events if name == "BLOCK_JOB_COMPLETED"]
    assert completed[0]["error"] == "internal error: RuntimeError: boom" and "error" not in completed[2]
    s.close()


async def test_a_job_created_while_another_reopens_its_target_finds_the_nodes_busy(chain: Path,
                                                                                   autojump_clock: Any) -> None:
    """The stress mode's find: an intermediate commit of img-2 into img-0 waits
    in the drain that reopens img-0 read-write (a guest read holds it); an
    active commit of the root into img-2 asked for meanwhile must be refused,
    not run beside it (the first would drop img-2, the second then pivot the
    device onto the closed node: every later guest write failed with EBADF)."""
    s = Setup(chain, [slow_read()])
    async with trio.open_nursery() as nursery:
        await nursery.start(s.manager.serve)
        reads: list[bytes] = []
        nursery.start_soon(lambda: _append_read(s.backend, reads))
        await wait_all_tasks_blocked()
        created: list[Any] = []

        async def first() -> None:
            created.append(await create_commit(s.manager, {"device": "drive0", "top-node": "img-2",
                                                           "base-node": "img-0", "job-id": "inner"}))

        nursery.start_soon(first)
        await wait_all_tasks_blocked()
        assert not created and s.graph.quiesce_counter  # its launch waits in the reopen's drain
        with pytest.raises(Exception, match="is busy: block device is in use by block job: commit"):
            await create_commit(s.manager, {"device": "drive0", "base-node": "img-2", "job-id": "outer"})
        with pytest.raises(Exception, match="Job ID 'inner' already in use"):  # nodes of its own, the id taken
            await create_stream(s.manager, {"device": "img-4", "base-node": "img-3", "job-id": "inner"})
        await until(lambda: bool(created))
        await created[0].done.wait()
        nursery.cancel_scope.cancel()
    assert created[0].error is None and reads
    assert s.node("img-3").backing_node.node_name == "img-0"
    await s.backend.write(0, b"\x11" * 4096)  # the root still takes writes
    assert bytes(await s.backend.read(0, 4096)) == b"\x11" * 4096
    s.close()
    for image in ("img-8.qcow2", "img-3.qcow2"):
        proc = qemu_img("check", chain / image)
        assert proc.returncode == 0, proc.stdout


async def test_two_snapshots_at_once_stack_and_each_old_root_is_reopened_after_its_sync(
        chain: Path, autojump_clock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stress mode's second find: a snapshot reopened the root read-only
    (closing its descriptor) while another snapshot's fdatasync of it still
    ran in a worker thread; the kernel then kept the old descriptor's image
    locks until that returned, the reopen's new locks were refused and the
    root was left with a closed file (every later guest write: EBADF). Now
    each snapshot moves the device first and syncs the old root after the
    drain; its reopen read-only waits for every sync of that file. Two at
    once: the second snapshots the first's overlay (or, if it looked the root
    up before the first moved it, finds it changed and does nothing)."""
    gates: list[trio.Event] = []

    async def held_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
        gate = trio.Event()
        gates.append(gate)
        await gate.wait()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", held_thread)
    s = Setup(chain, [])
    img8 = s.node("img-8")
    results: dict[str, Any] = {}

    async def snapshot(tag: str) -> None:
        try:
            results[tag] = await snapshot_sync(s.graph, {"device": "drive0", "snapshot-file": str(chain / f"{tag}.qcow2")})
        except Exception as exc:  # noqa: BLE001 - the refusal is what is checked
            results[tag] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(snapshot, "a")
        nursery.start_soon(snapshot, "b")
        await wait_all_tasks_blocked()
        assert gates and not results  # the device moved; the old roots' syncs are held in their threads
        assert s.backend.root.node_name in ("a", "b") and img8.writable  # no reopen under a running sync
        while len(results) < 2:
            for gate in gates:
                gate.set()
            await wait_all_tasks_blocked()
    made = [tag for tag in ("a", "b") if not isinstance(results[tag], Exception)]
    overlays = {results[tag] for tag in made}  # both, one over the other (either may go first), or one
    assert made and set(s.backend.root.chain()[:len(made)]) == overlays
    for tag in ("a", "b"):
        if tag not in made:
            assert "changed while the snapshot waited" in str(results[tag])
    below = s.backend.root.chain()[1:]
    assert img8 in below and not any(node.writable for node in below)  # every old root: a read-only backing
    await s.backend.write(0, b"\x22" * 4096)
    assert bytes(await s.backend.read(0, 4096)) == b"\x22" * 4096
    s.close()
    for image in [f"{tag}.qcow2" for tag in made] + ["img-8.qcow2"]:
        proc = qemu_img("check", chain / image)
        assert proc.returncode == 0, proc.stdout


async def test_the_pivot_is_told_only_once_base_is_durable_and_a_flush_waits_for_that(
        chain: Path, autojump_clock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pivot's drain runs no fdatasync (one held every guest request for
    up to 140 ms): base is synced after it while the guest writes to base.
    Until then the graph's listeners (the mount record) still name the old
    top, where everything flushed before the pivot is durable, and a guest
    flush after the pivot returns only once they name base: a kill -9 at
    any moment leaves the record naming a chain that holds every flushed byte."""
    gates: list[trio.Event] = []

    async def release(first: int = 0) -> None:
        for gate in gates[first:]:
            gate.set()
        await wait_all_tasks_blocked()

    s = Setup(chain, [])
    log: list[str] = []
    s.graph.listeners.append(lambda: log.append(f"told {s.backend.root.node_name}"))
    async with trio.open_nursery() as nursery:
        job = await pivot_with_syncs_held(s, nursery, monkeypatch, gates)
        assert s.backend.root.node_name == "img-6" and gates  # pivoted; base's sync held
        assert "told img-6" not in log and not job.done.is_set()
        await s.backend.write(2 * MIB, b"\x6b" * 4096)  # the guest writes to base meanwhile

        async def guest_flush() -> None:
            await s.backend.flush()
            log.append("flushed")

        nursery.start_soon(guest_flush)
        await wait_all_tasks_blocked()
        first_of_flush = len(gates) - 1
        while len(gates) > first_of_flush and "flushed" not in log:  # the flush's own syncs end...
            before = len(gates)
            await release(first_of_flush)
            if len(gates) == before:
                break
        assert "flushed" not in log  # ...but it waits until the pivot is told
        while not job.done.is_set():
            await release()
        await until(lambda: "flushed" in log)
        nursery.cancel_scope.cancel()
    assert job.error is None
    assert log.index("told img-6") < log.index("flushed")
    assert bytes(s.node("img-6").read(2 * MIB, 4096)) == b"\x6b" * 4096
    s.close()
    proc = qemu_img("check", chain / "img-6.qcow2")
    assert proc.returncode == 0, proc.stdout


async def test_a_guest_flush_after_a_snapshot_covers_what_it_wrote_into_the_old_root(
        chain: Path, autojump_clock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The snapshot moves the device first and writes the old root's metadata
    back after the drain, its syncs in worker threads. A guest flush after
    the move syncs the overlay, its root; it returns only once what the guest
    wrote into the old root before the snapshot is in that file too (a kill
    -9 would otherwise lose a write the guest had flushed)."""
    s = Setup(chain, [])
    img8 = s.node("img-8")
    gates: list[trio.Event] = []

    async def old_root_syncs_held(fn: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(fn, "__self__", None) is img8:  # the old root's syncs wait for the test
            gate = trio.Event()
            gates.append(gate)
            await gate.wait()
        return fn(*args)

    await s.backend.write(14 * MIB, b"\x5d" * 4096)  # a new cluster in img-8: its L2 entry pending
    monkeypatch.setattr(trio.to_thread, "run_sync", old_root_syncs_held)
    in_file_when_flushed: list[bool] = []

    async def guest_flush() -> None:
        await s.backend.flush()
        proc = qemu_io(chain / "img-8.qcow2", "read -P 0x5d 14M 4k", extra=("-U", "-r"))
        in_file_when_flushed.append("Pattern verification failed" not in proc.stdout and proc.returncode == 0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(snapshot_sync, s.graph, {"device": "drive0", "snapshot-file": str(chain / "snap.qcow2")})
        await wait_all_tasks_blocked()
        assert s.backend.root.node_name == "snap" and gates  # moved; the old root's sync held
        nursery.start_soon(guest_flush)
        await wait_all_tasks_blocked()
        while gates:
            gates.pop(0).set()
            await wait_all_tasks_blocked()
    assert in_file_when_flushed == [True]
    s.close()


async def test_an_io_error_syncing_base_after_the_pivot_ends_that_job_and_the_daemon_goes_on(
        chain: Path, autojump_clock: Any) -> None:
    """Base is synced after the pivot's drain; when its fdatasync fails (EIO,
    every time: a dead disk) the job ends with the error, and its abort's
    flush of base failing too does not take the job manager down: the
    device and a later job go on."""
    s = Setup(chain, [])
    async with trio.open_nursery() as nursery:
        await nursery.start(s.manager.serve)
        job = await create_commit(s.manager, {"device": "drive0", "base-node": "img-6"})
        await until(lambda: job.status == "ready")
        base = s.node("img-6")
        real_flush = base.driver.file.flush

        def failing_once_pivoted() -> None:
            if s.backend.root is base:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real_flush()

        base.driver.file.flush = failing_once_pivoted
        job.complete()
        with trio.fail_after(60):
            await job.done.wait()
        assert job.error == "Input/output error"
        base.driver.file.flush = real_flush
        assert bytes(await s.backend.read(0, 4096)) == b"\xff" * 4096  # the device goes on
        later = await create_commit(s.manager, {"device": "drive0", "top-node": "img-3", "base-node": "img-1"})
        with trio.fail_after(60):
            await later.done.wait()
        nursery.cancel_scope.cancel()
    assert later.error is None
    completed = [d for name, d in s.events if name == "BLOCK_JOB_COMPLETED"]
    assert completed[0]["error"] == "Input/output error" and "error" not in completed[1]
    s.close()


async def test_a_guest_flush_waiting_for_the_pivot_fails_when_base_does_not_sync(
        chain: Path, autojump_clock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest flush after the pivot syncs base itself, then waits for the
    pivot's sync of base; when that one fails (the disk's EIO, simulated:
    Linux reports it to one fdatasync only), the flush fails too instead of
    saying that what the pivot moved into base is durable."""
    gates: list[trio.Event] = []
    failing = fdatasync_failing_once(monkeypatch)
    s = Setup(chain, [])
    base = s.node("img-6")
    outcome: list[object] = []
    async with trio.open_nursery() as nursery:
        job = await pivot_with_syncs_held(s, nursery, monkeypatch, gates)
        assert s.backend.root is base and len(gates) == 1  # pivoted; the job's first sync of base held
        await s.backend.write(2 * MIB, b"\x6b" * 4096)

        async def guest_flush() -> None:
            try:
                await s.backend.flush()
                outcome.append("flushed")
            except OSError as exc:
                outcome.append(exc)

        nursery.start_soon(guest_flush)
        await wait_all_tasks_blocked()
        while len(gates) > 1 and not gates[-1].is_set():  # the flush's own syncs succeed
            for gate in gates[1:]:
                gate.set()
            await wait_all_tasks_blocked()
        assert not outcome  # it waits for the pivot's sync
        failing.append(base.driver.file.fd)  # which fails
        while not job.done.is_set():
            for gate in gates:
                gate.set()
            await wait_all_tasks_blocked()
        await until(lambda: bool(outcome))
        nursery.cancel_scope.cancel()
    assert job.error == "Input/output error"
    assert isinstance(outcome[0], OSError) and outcome[0].errno == errno.EIO
    base.driver.file.sync_failed = False  # let the test close the images
    s.close()


async def test_a_job_that_takes_the_old_root_during_a_snapshot_leaves_it_read_only(
        chain: Path, autojump_clock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot moves the device first and reopens the old root read-only
    only after syncing it; a job that another client starts on the old root
    meanwhile (an active commit into it) keeps the snapshot from reopening a
    node it uses, and makes it read-only itself at its end, as every backing
    a job wrote into: the old root does not stay a writable backing."""
    gates: list[trio.Event] = []
    s = Setup(chain, [])
    img8 = s.node("img-8")
    made: list[Any] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(s.manager.serve)
        monkeypatch.setattr(trio.to_thread, "run_sync", held_syncs(gates))

        async def snapshot() -> None:
            made.append(await snapshot_sync(s.graph, {"device": "drive0", "snapshot-file": str(chain / "a.qcow2")}))

        nursery.start_soon(snapshot)
        await wait_all_tasks_blocked()
        assert s.backend.root.node_name == "a" and img8.writable and gates  # moved; the old root's sync held
        job = await create_commit(s.manager, {"device": "drive0", "base-node": "img-8", "speed": 1024})
        while not made:
            for gate in gates:
                gate.set()
            await wait_all_tasks_blocked()
        assert img8.writable  # the job writes into it: the snapshot left it alone
        job.cancel(force=True)
        await job.done.wait()
        nursery.cancel_scope.cancel()
    assert job.status == "null" or job.status == "concluded"
    assert not img8.writable and s.backend.root.backing_node is img8
    s.close()
    for image in ("a.qcow2", "img-8.qcow2"):
        proc = qemu_img("check", chain / image)
        assert proc.returncode == 0, proc.stdout
