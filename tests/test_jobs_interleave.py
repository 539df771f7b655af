"""Deterministic interleavings of guest I/O, drains and block jobs, in-process.

Every test builds the daemon's objects without FUSE: a BlockGraph over a
three-image chain, the BlockBackend the export issues guest requests through
(`await backend.read/write`), and a JobManager. Interleavings are forced with
trio's tools, never with wall-clock timing: `wait_all_tasks_blocked` to reach
a state where everything else waits, a `Sequencer` where two actors must
take turns, the autojump MockClock so injected
blkdebug delays (Rule(delay_ms=...)) end only when nothing else can run, and
simulated time for the rate limit.

The chain (4 MiB, 64 KiB clusters):
    base.qcow2  0x11 everywhere
    mid.qcow2   0x22 in [1 MiB, 3 MiB)
    top.qcow2   0x33 in [0, 64 KiB) and [3 MiB, 3 MiB + 64 KiB)   (the device's root)
"""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
import trio
import trio.testing

import imgchain
from imgchain.backend import BlockBackend
from imgchain.blkdebug import BlkDebug, Rule
from imgchain.chain import open_backing_chain
from imgchain.create import create_image
from imgchain.graph import BlockGraph
from imgchain.jobs.commit import create_commit
from imgchain.jobs.copy import CHUNK
from imgchain.jobs.job import Job, JobError
from imgchain.jobs.manager import JobManager
from imgchain.jobs.stream import create_stream
from imgchain.node import Node

from .conftest import assert_qemu_clean

MiB = 1 << 20
SIZE = 4 * MiB
CLUSTER = 64 << 10


def layout() -> bytearray:
    """The guest-visible content of the chain as built."""
    data = bytearray(b"\x11" * SIZE)
    data[1 * MiB:3 * MiB] = b"\x22" * (2 * MiB)
    data[0:CLUSTER] = b"\x33" * CLUSTER
    data[3 * MiB:3 * MiB + CLUSTER] = b"\x33" * CLUSTER
    return data


def build_chain(d: Path, size: int = SIZE) -> Path:
    create_image(str(d / "base.qcow2"), "qcow2", size)
    create_image(str(d / "mid.qcow2"), backing_file="base.qcow2", backing_format="qcow2")
    create_image(str(d / "top.qcow2"), backing_file="mid.qcow2", backing_format="qcow2")
    with imgchain.open_chain(d / "base.qcow2", writable=True) as c:
        c.write(0, b"\x11" * size)
    with imgchain.open_chain(d / "mid.qcow2", writable=True) as c:
        c.write(1 * MiB, b"\x22" * (2 * MiB))
    with imgchain.open_chain(d / "top.qcow2", writable=True) as c:
        c.write(0, b"\x33" * CLUSTER)
        c.write(3 * MiB, b"\x33" * CLUSTER)
    return d / "top.qcow2"


def header_backing(path: Path) -> str | None:
    """The backing file named in `path`'s header, resolved against its directory."""
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output", "json", str(path)],
                                     capture_output=True, text=True, check=True).stdout)
    name = info.get("backing-filename")
    return name and os.path.relpath(os.path.join(path.parent, name), path.parent)


@dataclass
class Env:
    """The daemon's objects over one chain, and what happened to them."""

    dir: Path
    graph: BlockGraph
    backend: BlockBackend
    manager: JobManager
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    order: list[str] = field(default_factory=list)

    def node(self, name: str) -> Node:
        return self.graph.nodes[name]

    def names(self) -> list[str]:
        return [n.node_name for n in self.backend.root.chain()]

    def event_names(self, job_id: str = "drive0") -> list[str]:
        out = []
        for name, data in self.events:
            if name == "JOB_STATUS_CHANGE" and data["id"] == job_id:
                out.append(data["status"])
            elif name != "JOB_STATUS_CHANGE" and data.get("device", data.get("id")) == job_id:
                out.append(name)
        return out



@pytest.fixture(autouse=True)
def worker_threads_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the autojump clock, a task waiting for a worker thread lets
    simulated time jump to the next deadline (ending a held request early);
    running thread work inline keeps every interleaving here deterministic."""
    async def inline(fn: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(*args)
    monkeypatch.setattr(trio.to_thread, "run_sync", inline)

@pytest.fixture
def env(tmp_path: Path):
    top = open_backing_chain(str(build_chain(tmp_path)), writable=True)
    graph = BlockGraph()
    graph.add_chain(top)
    backend = BlockBackend(top, "drive0")
    graph.add_backend(backend)
    manager = JobManager(graph, BlkDebug([]))
    e = Env(tmp_path, graph, backend, manager)
    manager.listeners.append(lambda name, data: e.events.append((name, data)))
    yield e
    for node in list(graph.nodes.values()):
        node.close()
    assert_qemu_clean(*(tmp_path / f"{n}.qcow2" for n in ("base", "mid", "top")))


@asynccontextmanager
async def serving(manager: JobManager) -> AsyncIterator[trio.Nursery]:
    """The manager's job nursery (the daemon's lifetime) plus a nursery for guest tasks."""
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        yield nursery
        nursery.cancel_scope.cancel()


async def start_stream(env: Env, **args: Any) -> Job:
    return await create_stream(env.manager, {"device": "drive0", **args})


async def start_commit(env: Env, **args: Any) -> Job:
    return await create_commit(env.manager, {"device": "drive0", "top-node": "mid", "base-node": "base", **args})


START = {"stream": start_stream, "commit": start_commit}
# What each job leaves as the device's chain, and the header that changes.
AFTER = {"stream": (["top"], "top", None), "commit": (["top", "base"], "top", "base.qcow2")}


def read_all_through(env: Env) -> bytes:
    return bytes(env.backend.root.read(0, SIZE))


def record_graph_changes(env: Env) -> list[dict[str, int]]:
    """Instrument set_backing and replace_node: what was in flight when each ran."""
    seen: list[dict[str, int]] = []
    graph = env.graph
    for name in ("set_backing", "replace_node"):
        original = getattr(graph, name)

        def wrapped(*args: Any, _original: Callable[..., Any] = original, _name: str = name) -> Any:
            seen.append({"readers": graph.lock.readers, "in_flight": env.backend.in_flight,
                         "quiesced": env.backend.quiesce_counter})
            env.order.append(_name)
            return _original(*args)
        setattr(graph, name, wrapped)
    return seen


async def guest_read(env: Env, offset: int, length: int, tag: str, out: dict[str, bytes]) -> None:
    out[tag] = bytes(await env.backend.read(offset, length))
    env.order.append(tag)


async def guest_write(env: Env, offset: int, data: bytes, tag: str) -> None:
    await env.backend.write(offset, data)
    env.order.append(tag)


# -- (a) a guest request that arrives during a drain waits and then completes --

@pytest.mark.parametrize("kind", ["stream", "commit"])
async def test_request_during_drain_waits_then_completes(env: Env, kind: str, autojump_clock: Any) -> None:
    """A prepare's drain waits for an in-flight guest read (delayed by a
    blkdebug rule); reads and writes that arrive meanwhile are held, never
    failed, and run after the graph change with the right data."""
    changes = record_graph_changes(env)
    expected = layout()
    results: dict[str, bytes] = {}
    async with serving(env.manager) as nursery:
        job = await START[kind](env, **{"auto-finalize": False})
        await trio.testing.wait_all_tasks_blocked()
        assert job.status == "pending" and job.offset == SIZE
        # R1 is in flight (its injected delay ends only when everything else waits).
        env.backend.debug = BlkDebug([Rule(image="top", op="read", offset=0, length=CLUSTER,
                                           delay_ms=5000, once=True)])
        nursery.start_soon(guest_read, env, 0, CLUSTER, "R1", results)
        await trio.testing.wait_all_tasks_blocked()
        assert env.backend.in_flight == 1
        job.finalize()
        await trio.testing.wait_all_tasks_blocked()
        # prepare has begun its drain and waits for R1; the graph is unchanged.
        assert env.backend.quiesce_counter == 1 and env.names() == ["top", "mid", "base"]
        env.backend.debug = BlkDebug([])
        nursery.start_soon(guest_read, env, 2 * MiB, 2 * CLUSTER, "R2", results)
        nursery.start_soon(guest_write, env, 2 * MiB + 4 * CLUSTER, b"\x44" * 4096, "W2")
        nursery.start_soon(guest_read, env, 1 * MiB, CLUSTER, "R3", results)
        await trio.testing.wait_all_tasks_blocked()
        assert env.backend.in_flight == 1  # only R1: the new requests wait, none failed
        assert env.order == [] and env.names() == ["top", "mid", "base"]
        await job.done.wait()  # R1's delay ends, the drain completes, prepare changes the graph
        await trio.testing.wait_all_tasks_blocked()
    change = "set_backing" if kind == "stream" else "replace_node"
    assert env.order[:2] == ["R1", change]
    assert sorted(env.order[2:]) == ["R2", "R3", "W2"]
    assert changes == [{"readers": 0, "in_flight": 0, "quiesced": 1}]
    assert env.event_names()[-5:] == ["pending", "BLOCK_JOB_PENDING", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert env.names() == AFTER[kind][0]
    assert results["R1"] == expected[0:CLUSTER]
    assert results["R2"] == expected[2 * MiB:2 * MiB + 2 * CLUSTER]
    assert results["R3"] == expected[1 * MiB:1 * MiB + CLUSTER]
    expected[2 * MiB + 4 * CLUSTER:2 * MiB + 4 * CLUSTER + 4096] = b"\x44" * 4096
    assert read_all_through(env) == expected


# -- (b) pause arriving mid-chunk takes effect at the next pause point ---------

async def test_pause_mid_chunk_takes_effect_after_the_chunk(env: Env, autojump_clock: Any) -> None:
    # The job's read of its second chunk (offset 1 MiB) takes 1 simulated second.
    env.manager.debug = BlkDebug([Rule(image="mid", op="read", offset=1 * MiB, length=CHUNK,
                                       delay_ms=1000, once=True)])
    statuses: list[tuple[str, int, bool]] = []
    job_ref: list[Job] = []

    def on_event(name: str, data: dict[str, Any]) -> None:
        if name == "JOB_STATUS_CHANGE" and job_ref:
            statuses.append((data["status"], job_ref[0].offset, job_ref[0].busy))
    env.manager.listeners.append(on_event)
    async with serving(env.manager):
        job = await start_stream(env)
        job_ref.append(job)
        await trio.testing.wait_all_tasks_blocked()
        assert job.busy and job.offset == 1 * MiB and job.status == "running"
        t0 = trio.current_time()
        job.pause()
        info = job.query_block_job()
        assert info["paused"] is True and info["status"] == "running"  # at once in query, not in status
        await trio.testing.wait_all_tasks_blocked()
        assert job.status == "running" and job.busy  # still inside the chunk
        await trio.sleep(30)  # simulated: the chunk ends after 1 s, then the job stays paused
        assert job.status == "paused" and not job.busy
        assert job.offset == 2 * MiB  # the chunk under way finished; no further chunk started
        assert statuses == [("paused", 2 * MiB, False)]
        assert trio.current_time() - t0 == pytest.approx(30)
        await trio.sleep(100)
        assert job.offset == 2 * MiB and job.status == "paused"
        job.resume()
        await job.done.wait()
    assert [s for s, _, _ in statuses] == ["paused", "running", "waiting", "pending", "concluded", "null"]
    assert env.names() == ["top"]
    assert read_all_through(env) == layout()



async def test_resume_during_a_drain_waits_for_its_end(env: Env) -> None:
    """A user-paused job, a drain and a resume interleave (ordered by a
    Sequencer): the resume does not let the job run while the drain holds it;
    the end of the drain does."""
    seq = trio.testing.Sequencer()
    async with serving(env.manager) as nursery:
        job = await start_stream(env)
        job.pause()  # in created: the job stops at its first pause point
        await trio.testing.wait_all_tasks_blocked()
        assert job.status == "paused" and job.offset == 0

        async def drainer() -> None:
            async with seq(0):
                drain = env.graph.drained()
                await drain.__aenter__()
            async with seq(2):
                assert job.status == "paused" and job.offset == 0
                await drain.__aexit__(None, None, None)

        async def user() -> None:
            async with seq(1):
                job.resume()
                await trio.testing.wait_all_tasks_blocked()
                assert job.status == "paused" and job.offset == 0 and job.pause_count == 1
                assert env.backend.quiesce_counter == 1

        nursery.start_soon(drainer)
        nursery.start_soon(user)
        await job.done.wait()
    assert env.event_names()[:4] == ["created", "running", "paused", "running"]
    assert env.names() == ["top"] and read_all_through(env) == layout()


async def test_job_started_during_a_drain_waits_for_its_end(env: Env) -> None:
    async with serving(env.manager):
        async with env.graph.drained():
            job = await start_stream(env)
            await trio.testing.wait_all_tasks_blocked()
            assert job.offset == 0 and job.status in ("created", "paused")
            assert env.names() == ["top", "mid", "base"]
        await job.done.wait()
    assert env.names() == ["top"] and read_all_through(env) == layout()

# -- (c) cancel around prepare ------------------------------------------------

@pytest.mark.parametrize("kind", ["stream", "commit"])
async def test_cancel_while_pending_leaves_the_chain(env: Env, kind: str) -> None:
    """auto-finalize=false: the job waits in pending (BLOCK_JOB_PENDING); a cancel
    there aborts it (QEMU: cancel is a verb of pending) and nothing in the graph
    or the headers changes."""
    changes = record_graph_changes(env)
    async with serving(env.manager):
        job = await START[kind](env, **{"auto-finalize": False})
        await trio.testing.wait_all_tasks_blocked()
        assert job.status == "pending"
        assert ("BLOCK_JOB_PENDING", {"type": kind, "id": "drive0"}) in env.events
        job.cancel()
        await job.done.wait()
    assert env.event_names()[-7:] == ["waiting", "pending", "BLOCK_JOB_PENDING", "aborting",
                                      "BLOCK_JOB_CANCELLED", "concluded", "null"]
    assert "BLOCK_JOB_COMPLETED" not in env.event_names()
    assert changes == [] and env.names() == ["top", "mid", "base"]
    assert env.manager.jobs == {} and env.graph.jobs == []
    assert all(not n.blockers for n in env.graph.nodes.values())
    assert all(link.frozen is False for n in env.graph.nodes.values() for link in n.parents)
    assert header_backing(env.dir / "top.qcow2") == "mid.qcow2"
    assert header_backing(env.dir / "mid.qcow2") == "base.qcow2"
    assert read_all_through(env) == layout()


@pytest.mark.parametrize("kind", ["stream", "commit"])
@pytest.mark.parametrize("auto_finalize", [True, False])
async def test_cancel_while_prepare_drains_is_too_late(env: Env, kind: str, auto_finalize: bool,
                                                       autojump_clock: Any) -> None:
    """A cancel that arrives while prepare waits for its drain: the verb table
    accepts cancel in pending, so no error; but in QEMU no QMP command runs
    inside prepare (the monitor is not dispatched from a drain's poll), so the
    cancel is handled only once the job has completed: the job ends with
    BLOCK_JOB_COMPLETED and the graph change stands, never half done."""
    changes = record_graph_changes(env)
    results: dict[str, bytes] = {}
    async with serving(env.manager) as nursery:
        if auto_finalize:  # hold the job in its third chunk (1 simulated second)
            env.manager.debug = BlkDebug([Rule(image="mid", op="read", offset=2 * MiB, length=CHUNK,
                                               delay_ms=1000, once=True)])
        job = await START[kind](env, **{"auto-finalize": auto_finalize})
        await trio.testing.wait_all_tasks_blocked()
        # R1 is in flight for 5 simulated seconds.
        env.backend.debug = BlkDebug([Rule(image="top", op="read", delay_ms=5000, once=True)])
        nursery.start_soon(guest_read, env, 0, CLUSTER, "R1", results)
        await trio.testing.wait_all_tasks_blocked()
        assert env.backend.in_flight == 1
        if auto_finalize:
            assert job.status == "running" and job.busy
            await trio.sleep(2)  # the chunk ends at 1 s; prepare then waits for R1 (until 5 s)
        else:
            assert job.status == "pending"
            job.finalize()
            await trio.testing.wait_all_tasks_blocked()
        assert job.status == "pending" and env.backend.quiesce_counter == 1
        assert env.names() == ["top", "mid", "base"]
        job.cancel()  # accepted (pending takes cancel) ...
        job.cancel(force=True)
        await job.done.wait()
    assert env.event_names()[-3:] == ["BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert "BLOCK_JOB_CANCELLED" not in env.event_names() and "aborting" not in env.event_names()
    completed = [d for n, d in env.events if n == "BLOCK_JOB_COMPLETED"]
    assert "error" not in completed[0]
    assert len(changes) == 1 and changes[0]["readers"] == 0
    assert env.names() == AFTER[kind][0]
    assert header_backing(env.dir / f"{AFTER[kind][1]}.qcow2") == AFTER[kind][2]
    assert results["R1"] == layout()[:CLUSTER]
    assert read_all_through(env) == layout()





@pytest.mark.parametrize("kind", ["stream", "commit"])
async def test_cancel_right_after_finalize_does_not_undo_it(env: Env, kind: str) -> None:
    """job-finalize then block-job-cancel with no job step in between (two QMP
    commands handled back to back). In QEMU finalize runs prepare and the
    completion inside the command, so the cancel finds a concluded (or
    dismissed) job and is refused: the job ends COMPLETED, the graph changed."""
    changes = record_graph_changes(env)
    async with serving(env.manager):
        job = await START[kind](env, **{"auto-finalize": False})
        await trio.testing.wait_all_tasks_blocked()
        assert job.status == "pending"
        job.finalize()
        try:
            job.cancel()
        except JobError:
            pass  # refused: QEMU's answer (the job is concluded or gone)
        await job.done.wait()
    assert "BLOCK_JOB_CANCELLED" not in env.event_names()
    assert env.event_names()[-3:] == ["BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert len(changes) == 1 and env.names() == AFTER[kind][0]

# -- (d) a guest write racing the job's copy of the same cluster ---------------

RACE_AT = 1 * MiB + 5 * CLUSTER  # inside the job's second chunk, stored in mid (0x22)


@pytest.mark.parametrize("window", ["read", "write"])
@pytest.mark.parametrize("kind", ["stream", "commit"])
async def test_guest_write_racing_the_copy_survives(env: Env, kind: str, window: str,
                                                    autojump_clock: Any) -> None:
    """The job's I/O of the range holding cluster X is delayed (before it reads
    X, or after it read X and before it writes it); the guest writes part of
    X, all of X+1 and zeroes part of X+2 through the device meanwhile. After the job the guest's
    bytes are what the device shows (stream: the job never overwrites a
    cluster the guest wrote into top with its older copy)."""
    source, target = {"stream": ("mid", "top"), "commit": ("mid", "base")}[kind]
    rule = {"read": Rule(image=source, op="read", offset=RACE_AT, length=CLUSTER, delay_ms=1000, once=True),
            "write": Rule(image=target, op="write", offset=RACE_AT, length=CLUSTER, delay_ms=1000, once=True)}
    env.manager.debug = BlkDebug([rule[window]])
    async with serving(env.manager):
        job = await START[kind](env)
        await trio.testing.wait_all_tasks_blocked()
        assert job.busy and job.offset == 1 * MiB  # inside the chunk holding X, in the delayed step
        assert job.stage == window
        await env.backend.write(RACE_AT + 100, b"\x55" * 512)
        await env.backend.write(RACE_AT + CLUSTER, b"\x66" * CLUSTER)
        await env.backend.write_zeroes(RACE_AT + 2 * CLUSTER + 512, 1024)
        assert job.busy and job.offset == 1 * MiB  # the writes did not wait for the job's chunk
        await job.done.wait()
    assert [n for n, _ in env.events if n.startswith("BLOCK_JOB")] == ["BLOCK_JOB_COMPLETED"]
    expected = layout()
    expected[RACE_AT + 100:RACE_AT + 612] = b"\x55" * 512
    expected[RACE_AT + CLUSTER:RACE_AT + 2 * CLUSTER] = b"\x66" * CLUSTER
    expected[RACE_AT + 2 * CLUSTER + 512:RACE_AT + 2 * CLUSTER + 1536] = bytes(1024)
    assert env.names() == AFTER[kind][0]
    assert read_all_through(env) == expected
    if kind == "stream":  # top now stands alone and holds the guest's bytes
        assert bytes(env.node("top").read(RACE_AT, 3 * CLUSTER)) == expected[RACE_AT:RACE_AT + 3 * CLUSTER]


# -- (e) the rate limit, in simulated time --------------------------------------

@pytest.fixture
def flat(tmp_path: Path):
    """base.qcow2 (16 MiB of 0x11) <- top.qcow2 (empty): a full stream copies every byte."""
    size = 16 * MiB
    create_image(str(tmp_path / "base.qcow2"), "qcow2", size)
    with imgchain.open_chain(tmp_path / "base.qcow2", writable=True) as c:
        c.write(0, b"\x11" * size)
    create_image(str(tmp_path / "top.qcow2"), backing_file="base.qcow2", backing_format="qcow2")
    top = open_backing_chain(str(tmp_path / "top.qcow2"), writable=True)
    graph = BlockGraph()
    graph.add_chain(top)
    backend = BlockBackend(top, "drive0")
    graph.add_backend(backend)
    e = Env(tmp_path, graph, backend, JobManager(graph, BlkDebug([])))
    yield e
    for node in list(graph.nodes.values()):
        node.close()
    assert_qemu_clean(tmp_path / "top.qcow2", tmp_path / "base.qcow2")




@pytest.mark.parametrize("speed", [512 << 10, 2 * MiB])
async def test_rate_limit_copies_speed_bytes_per_simulated_second(flat: Env, speed: int,
                                                                 autojump_clock: Any) -> None:
    """With speed S the job has copied about S*t bytes after t simulated seconds
    (QEMU: 100 ms slices; an oversized chunk is paid for afterwards, so the
    lead is at most a chunk or two)."""
    samples: list[tuple[float, int]] = []
    async with serving(flat.manager):
        job = await create_stream(flat.manager, {"device": "drive0", "speed": speed})
        t0 = trio.current_time()
        while not job.done.is_set() and job.offset < 12 * MiB:
            await trio.sleep(0.25)
            samples.append((trio.current_time() - t0, job.offset))
        if not job.done.is_set():
            job.set_speed(0)
        await job.done.wait()
    assert len(samples) >= 12 * MiB // speed  # it took at least 12 MiB / S simulated seconds
    for t, done in samples:
        assert done <= speed * t + 2 * CHUNK, (t, done, samples)
        assert done >= speed * t - 2 * CHUNK, (t, done, samples)


async def test_set_speed_zero_lifts_the_limit_at_once(flat: Env, autojump_clock: Any) -> None:
    async with serving(flat.manager):
        job = await create_stream(flat.manager, {"device": "drive0", "speed": 64 << 10})  # 4 min for 16 MiB
        await trio.testing.wait_all_tasks_blocked()  # the job sleeps in its rate limit (simulated time stands)
        assert 0 < job.offset < 4 * MiB and job.status == "running" and not job.busy
        lifted = trio.current_time()
        job.set_speed(0)  # wakes the job from its rate-limit sleep
        await job.done.wait()
        assert trio.current_time() == lifted  # no simulated time passed until the end
    assert flat.names() == ["top"]
    assert bytes(flat.backend.root.read(0, 16 * MiB)) == b"\x11" * (16 * MiB)


# -- (f) no graph change while a guest request is in flight ---------------------

async def guest_storm(env: Env, seed: int) -> None:
    """Keep a guest request in flight at every moment (each takes simulated time)."""
    import random
    rng = random.Random(seed)
    while True:
        offset = rng.randrange(0, SIZE // 4096) * 4096
        if rng.random() < 0.3:
            await env.backend.write(offset, bytes([0x80 + seed]) * 4096)
        else:
            await env.backend.read(offset, 4096)


def storm_rules() -> BlkDebug:
    return BlkDebug([Rule(image="top", op="read", delay_ms=7), Rule(image="top", op="write", delay_ms=3)])


async def job_under_storm(env: Env, kind: str) -> Job:
    """Run a job of `kind` to its end while three guest tasks read and write (slowed by blkdebug)."""
    env.backend.debug = storm_rules()
    async with serving(env.manager) as nursery:
        for seed in range(3):
            nursery.start_soon(guest_storm, env, seed)
        job = await START[kind](env)
        await job.done.wait()
        nursery.cancel_scope.cancel()
    return job


@pytest.mark.parametrize("kind", ["stream", "commit"])
async def test_no_graph_change_with_a_guest_request_in_flight(env: Env, kind: str, autojump_clock: Any) -> None:
    changes = record_graph_changes(env)
    in_flight_at_pending: list[int] = []
    env.manager.listeners.append(lambda name, data: in_flight_at_pending.append(env.backend.in_flight)
                                 if data.get("status") == "pending" else None)
    job = await job_under_storm(env, kind)
    assert in_flight_at_pending == [3]  # the drain had requests to wait for
    assert changes == [{"readers": 0, "in_flight": 0, "quiesced": 1}]
    assert env.names() == AFTER[kind][0]


@pytest.mark.parametrize("kind", ["stream", "commit"])
async def test_the_check_catches_a_graph_change_without_drain(env: Env, kind: str, autojump_clock: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The same run with the drain skipped: the graph change meets guest
    requests in flight and the graph lock refuses it (the test above would
    fail). The broken invariant ends that job with an internal error; the
    guest's requests and the manager go on."""
    @asynccontextmanager
    async def no_drain(node: Any = None) -> AsyncIterator[None]:
        yield

    monkeypatch.setattr(env.graph, "drained", no_drain)
    changes = record_graph_changes(env)
    job = await job_under_storm(env, kind)
    assert changes == [{"readers": 3, "in_flight": 3, "quiesced": 0}]
    assert job.error is not None and job.error.startswith("internal error: AssertionError:"), job.error
    assert "drain first" in job.error
    assert env.names() == ["top", "mid", "base"]  # refused before anything changed
