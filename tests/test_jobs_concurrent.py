"""Two jobs on one chain, in random finishing orders (BLOCK-JOBS.md section 4, scenarios 20 and 21).

Scenario 20: a stream whose base is the top of a running intermediate commit
(QEMU 7.2 refuses or leaves a wrong chain; imgchain must end right in both
orders). Scenario 21, the seed's case (iotest 030 test_overlapping_5): a
stream with `bottom` just above the top of a running commit; never a crash,
never the dropped node reinstalled. Each run builds the P9 chain, starts
both jobs with random throttles, lifts them in a random order after random
delays while a writer keeps writing through the device and checking what it
reads, and then checks: both jobs completed without error, img-4's backing
is img-0 in the graph and in its header (format raw), the device shows
exactly the writer's model, and every image passes `qemu-img check`.
These run in-process (the same engine as a mount's daemon) so that 50 runs
of scenario 21 take seconds; the QMP scenarios test the same through a mount.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from imgchain.backend import BlockBackend
from imgchain.chain import open_backing_chain
from imgchain.graph import BlockGraph
from imgchain.jobs.commit import create_commit
from imgchain.jobs.job import VERBS
from imgchain.jobs.manager import JobManager
from imgchain.jobs.stream import create_stream

from .conftest import qemu_img, qemu_io

MIB = 1 << 20


def build_p9(directory: Path) -> None:
    """img-0 raw 16 MiB <- img-1 <- ... <- img-8; 0xff in img-7 [0,2M),
    img-5 [4M,8M), img-3 [8M,10M), img-1 [12M,16M)."""
    qemu_img("create", "-q", "-f", "raw", directory / "img-0.raw", "16M", check=True)
    for i in range(1, 9):
        below, fmt = ("img-0.raw", "raw") if i == 1 else (f"img-{i - 1}.qcow2", "qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-b", below, "-F", fmt, directory / f"img-{i}.qcow2", check=True)
    for i, (start, length) in {7: (0, 2), 5: (4, 4), 3: (8, 2), 1: (12, 4)}.items():
        qemu_io(directory / f"img-{i}.qcow2", f"write -P 0xff {start}M {length}M")


@pytest.fixture(scope="module")
def p9_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("p9")
    build_p9(directory)
    return directory


def fresh_p9(template: Path, directory: Path) -> Path:
    for f in template.iterdir():
        shutil.copy(f, directory / f.name)
    return directory / "img-8.qcow2"


async def writer(backend: BlockBackend, model: bytearray, rng: random.Random, stop: trio.Event) -> None:
    """Writes random blocks through the device and checks each read-back."""
    while not stop.is_set():
        offset = rng.randrange(0, len(model) - 8192)
        data = bytes([rng.randrange(256)]) * rng.choice([512, 4096, 8192])
        await backend.write(offset, data)
        model[offset:offset + len(data)] = data
        check = rng.randrange(0, len(model) - 4096)
        got = await backend.read(check, 4096)
        assert bytes(got) == bytes(model[check:check + 4096]), f"wrong bytes at {check}"
        await trio.sleep(rng.choice([0, 0.001]))


async def run_two_jobs(top_path: Path, stream_args: dict, seed: int) -> tuple[BlockGraph, list]:
    rng = random.Random(seed)
    graph = BlockGraph()
    top = open_backing_chain(str(top_path), writable=True)
    graph.add_chain(top)
    backend = BlockBackend(top)
    graph.add_backend(backend)
    manager = JobManager(graph)
    model = bytearray(await backend.read(0, 16 * MIB))
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        nursery.start_soon(writer, backend, model, rng, stop)
        commit = await create_commit(manager, {"device": "drive0", "top-node": "img-2", "base-node": "img-0",
                                               "speed": rng.choice([256 << 10, 1 << 20, 4 << 20])})
        stream = await create_stream(manager, {"device": "img-4", "job-id": "img-4", **stream_args,
                                               "speed": rng.choice([0, 512 << 10, 2 << 20])})
        jobs = [commit, stream]
        rng.shuffle(jobs)
        for job in jobs:  # lift the throttles in a random order, at random moments
            await trio.sleep(rng.choice([0, 0.005, 0.02, 0.05]))
            if job.status in VERBS["set-speed"]:  # not once it is finishing
                job.set_speed(0)
        for job in jobs:
            await job.done.wait()
        stop.set()
        nursery.cancel_scope.cancel()
    assert bytes(await backend.read(0, 16 * MIB)) == bytes(model)
    results = [(j.id, j.status, j.error) for j in (commit, stream)]
    return graph, results


def close_all(graph: BlockGraph) -> None:
    for node in list(graph.nodes.values()):
        node.close()


def check_result(directory: Path, graph: BlockGraph, results: list) -> None:
    assert [(job_id, error) for job_id, _, error in results] == [("drive0", None), ("img-4", None)]
    img4 = graph.nodes["img-4"]
    assert img4.backing_node is not None and img4.backing_node.node_name == "img-0"
    assert "img-2" not in graph.nodes and "img-1" not in graph.nodes  # never reinstalled
    close_all(graph)
    info = json.loads(qemu_img("info", "--output", "json", directory / "img-4.qcow2", check=True).stdout)
    assert Path(directory / info["backing-filename"]).resolve() == (directory / "img-0.raw").resolve() \
        or Path(info["backing-filename"]).resolve() == (directory / "img-0.raw").resolve()
    assert info["backing-filename-format"] == "raw"
    for i in range(1, 9):
        proc = qemu_img("check", directory / f"img-{i}.qcow2")
        assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("seed", range(10))
def test_scenario_20_stream_whose_base_is_being_committed(p9_template: Path, tmp_path: Path, seed: int) -> None:
    top = fresh_p9(p9_template, tmp_path)
    graph, results = trio.run(run_two_jobs, top, {"base-node": "img-2"}, seed)
    check_result(tmp_path, graph, results)
    # img-4 now holds img-3's data (0xff at [8M,10M)), pulled by the stream
    proc = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "alloc 8M 2M", str(tmp_path / "img-4.qcow2")],
                          capture_output=True, text=True)
    assert "2097152/2097152 bytes allocated" in proc.stdout, proc.stdout


@pytest.mark.parametrize("seed", range(50))
def test_scenario_21_overlapping_5(p9_template: Path, tmp_path: Path, seed: int) -> None:
    top = fresh_p9(p9_template, tmp_path)
    graph, results = trio.run(run_two_jobs, top, {"bottom": "img-3"}, 1000 + seed)
    check_result(tmp_path, graph, results)
