"""Stress: random job mixes on random chains under a verifying writer (any number of rounds).

Each round builds a random chain (3 to 8 images, raw or qcow2 base, cluster
sizes from 4 KiB to 128 KiB, random data in random layers, made with qemu-img
and qemu-io), opens it on the same engine a mount's daemon runs (graph,
device, job manager), and while a writer keeps writing through the device and
checking what it reads back, starts random jobs one after another: streams
(base, base-node or bottom), intermediate commits, active commits (completed
or cancelled, soft or forced), and live snapshots, each with a random
throttle lifted at a random moment. Jobs that conflict are refused (that is
part of the test: a refusal must be one of QEMU's messages). After the round:
no job failed, the device shows exactly the writer's model, the chain in the
graph is the chain the headers describe, and every image passes
`qemu-img check`.

    .venv/bin/python -m tests.stress_jobs --rounds 200 [--seed N]

Prints one line per round and exits 1 at the first failing round (its seed
reproduces it). `make test` runs 4 rounds (tests/test_stress_jobs.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

from imgchain.backend import BlockBackend
from imgchain.chain import open_backing_chain, resolve_backing_name
from imgchain.errors import ImgchainError
from imgchain.graph import BlockGraph
from imgchain.jobs.commit import create_commit
from imgchain.jobs.job import VERBS
from imgchain.jobs.manager import JobManager
from imgchain.jobs.snapshot import snapshot_sync
from imgchain.jobs.stream import create_stream

MIB = 1 << 20
REFUSALS = ("is busy", "Cannot change", "not a backing image", "cannot commit an image into itself",
            "is not in this backing file chain", "not in a chain starting from", "already in use",
            "is no longer below", "Cannot find", "not supported", "cannot grow", "Could not create",
            "changed while the snapshot waited")


def sh(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


def build_chain(directory: Path, rng: random.Random) -> Path:
    size = rng.choice([4, 8]) * MIB
    depth = rng.randint(3, 8)
    base_fmt = rng.choice(["raw", "qcow2"])
    names = [f"n{i}.{base_fmt if i == 0 else 'qcow2'}" for i in range(depth)]
    sh("qemu-img", "create", "-q", "-f", base_fmt, "-o" if base_fmt == "qcow2" else "-q",
       *(["cluster_size=65536"] if base_fmt == "qcow2" else []), directory / names[0], str(size))
    for i in range(1, depth):
        cs = rng.choice([4096, 16384, 65536, 131072])
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", "-b", names[i - 1],
           "-F", "raw" if i == 1 and base_fmt == "raw" else "qcow2", directory / names[i])
    for i in range(depth):
        cmds = []
        for _ in range(rng.randint(0, 6)):
            off = rng.randrange(0, size - 256 * 1024) // 512 * 512
            cmds += ["-c", f"write -P 0x{rng.randrange(1, 255):02x} {off} {rng.choice([512, 4096, 65536, 262144])}"]
        if cmds:
            fmt = "raw" if names[i].endswith(".raw") else "qcow2"
            sh("qemu-io", "-f", fmt, *cmds, directory / names[i])
    return directory / names[-1]


class Round:
    def __init__(self, top: Path, seed: int) -> None:
        self.rng = random.Random(seed)
        self.dir = top.parent
        self.graph = BlockGraph()
        self.graph.add_chain(open_backing_chain(str(top), writable=True))
        self.backend = BlockBackend(self.graph.nodes[top.stem])
        self.graph.add_backend(self.backend)
        self.manager = JobManager(self.graph)
        self.failures: list[str] = []
        self.snapshots = 0
        self.done: list[str] = []  # what each job ended as (for the round's line)

    async def writer(self, model: bytearray, stop: trio.Event) -> None:
        rng = random.Random(self.rng.random())
        while not stop.is_set():
            off = rng.randrange(0, len(model) - 8192)
            data = bytes([rng.randrange(256)]) * rng.choice([1, 512, 4096, 8192])
            await self.backend.write(off, data)
            model[off:off + len(data)] = data
            check = rng.randrange(0, len(model) - 4096)
            got = bytes(await self.backend.read(check, 4096))
            if got != bytes(model[check:check + 4096]):
                self.failures.append(f"wrong bytes read at {check}")
                stop.set()
            await trio.sleep(rng.choice([0, 0.0005, 0.002]))

    def _chain_names(self) -> list[str]:
        return [n.node_name for n in self.backend.root.chain()]

    async def one_job(self) -> None:
        names = self._chain_names()
        kind = self.rng.choice(["stream", "stream", "commit", "active", "snapshot"])
        speed = self.rng.choice([0, 256 << 10, 2 * MIB])
        try:
            if kind == "snapshot":
                self.snapshots += 1
                await snapshot_sync(self.graph, {"device": "drive0",
                                                 "snapshot-file": str(self.dir / f"snap{self.snapshots}.qcow2")})
                self.done.append("snapshot")
                return
            if kind == "stream":
                top = self.rng.randrange(0, len(names))
                args = {"device": names[top], "job-id": f"j{self.rng.randrange(1 << 30)}", "speed": speed}
                below = names[top + 1:]
                choice = self.rng.choice(["full", "base-node", "bottom"])
                if choice == "base-node" and below:
                    args["base-node"] = self.rng.choice(below)
                elif choice == "bottom":
                    args["bottom"] = self.rng.choice(names[top:])
                job = await create_stream(self.manager, args)
            else:
                top = 0 if kind == "active" else self.rng.randrange(1, max(2, len(names) - 1))
                if top >= len(names) - 1:
                    return
                base = self.rng.randrange(top + 1, len(names))
                job = await create_commit(self.manager, {"device": "drive0", "top-node": names[top],
                                                         "base-node": names[base], "speed": speed,
                                                         "job-id": f"j{self.rng.randrange(1 << 30)}"})
        except ImgchainError as exc:
            if not any(r in str(exc) for r in REFUSALS):
                self.failures.append(f"{kind}: unexpected refusal: {exc}")
            self.done.append(f"{kind} refused")
            return
        await trio.sleep(self.rng.choice([0, 0.01, 0.05]))
        if job.status in VERBS["set-speed"]:
            job.set_speed(0)
        if kind == "active":
            await self._finish_active(job)
        await job.done.wait()
        self.done.append(f"{kind} {'ok' if job.error is None else job.error}")
        if job.error is not None and job.error != "Operation canceled":
            self.failures.append(f"{kind} {job.id}: {job.error}")

    async def _finish_active(self, job) -> None:  # type: ignore[no-untyped-def]
        while job.status not in ("ready", "concluded", "null"):
            await trio.sleep(0.005)
        if job.status != "ready":
            return
        action = self.rng.choice(["complete", "complete", "soft", "force"])
        if action == "complete":
            job.complete()
        else:
            job.cancel(force=action == "force")

    async def run(self, jobs: int) -> None:
        size = self.backend.size
        model = bytearray(await self.backend.read(0, size))
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.manager.serve)
            nursery.start_soon(self.writer, model, stop)
            async with trio.open_nursery() as jobs_nursery:
                for _ in range(jobs):
                    jobs_nursery.start_soon(self.one_job)
                    await trio.sleep(self.rng.choice([0, 0.01, 0.03]))
            stop.set()
            nursery.cancel_scope.cancel()
        if bytes(await self.backend.read(0, size)) != bytes(model):
            self.failures.append("the device does not show the writer's model")

    def check_on_disk(self) -> None:
        chain = self.backend.root.chain()
        for node in list(self.graph.nodes.values()):
            node.close()
        for upper, lower in zip(chain, chain[1:]):
            info = json.loads(subprocess.run(["qemu-img", "info", "--output", "json", upper.filename],
                                             capture_output=True, text=True, check=True).stdout)
            named = resolve_backing_name(upper.filename, info.get("backing-filename", ""))
            if not os.path.exists(named) or not os.path.samefile(named, lower.filename):
                self.failures.append(f"{upper.filename}'s header names {info.get('backing-filename')!r}, "
                                     f"the graph has {lower.filename}")
        for path in sorted(self.dir.glob("*.qcow2")):
            proc = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
            if proc.returncode != 0:
                self.failures.append(f"qemu-img check {path.name}: exit {proc.returncode}: {proc.stdout.strip()}")


def run_round(seed: int, work: Path, jobs: int = 6) -> tuple[list[str], list[str]]:
    """(failures, what each job ended as)."""
    directory = work / f"round-{seed}"
    directory.mkdir()
    top = build_chain(directory, random.Random(seed))
    r = Round(top, seed)
    trio.run(r.run, jobs)
    r.check_on_disk()
    return r.failures, r.done


def main() -> int:
    parser = argparse.ArgumentParser(description="Random job mixes on random chains")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=6, help="jobs started per round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seed, args.seed + args.rounds):
            failures, done = run_round(seed, Path(tmp), args.jobs)
            print(f"round {seed}: {'ok' if not failures else 'FAILED: ' + '; '.join(failures)} "
                  f"({', '.join(done)})", flush=True)
            if failures:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
