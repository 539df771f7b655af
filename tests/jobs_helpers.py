"""Helpers for the block-job scenarios run through QMP against real mounts (tests/test_jobs_scenarios.py).

- Fixtures of BLOCK-JOBS.md section 4, built with qemu-img and qemu-io only
  (so imgchain's own writer is not its own oracle): `make_s3`, `make_c3`,
  `make_p9`, and `make_chain` for the one-off chains of single scenarios.
- `Qmp`: a `qemu.qmp` client (a client nobody here wrote) that records every
  event, runs a command and waits for the events it should cause.
- `VerifyingWriter`: a thread that keeps writing random blocks to the mounted
  file, re-reads them and random other ranges, and checks every byte against
  its model of the guest-visible content.
- Image checks made with qemu-img: `info`, `own_map` / `presence` (the
  allocation of one image alone), `guest_content`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from qemu.qmp import EventListener, ExecuteError, QMPClient

from .conftest import qemu_img, qemu_io

KiB, MiB = 1 << 10, 1 << 20
TIMEOUT = 120.0  # seconds any single wait may take before the test fails (never asserted as a timing)

# -- fixtures ------------------------------------------------------------------


def _io(image: Path, fmt: str, *commands: str) -> None:
    proc = qemu_io(image, *commands, fmt=fmt)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), f"qemu-io {image}: {proc.stdout}{proc.stderr}"


def make_chain(directory: Path, layers: list[tuple[str, int, list[tuple[int, int, int]]]]) -> list[Path]:
    """Images from the bottom up: (file name, size, [(pattern byte, offset, length)]).

    The first is raw if its name ends in .raw; every other one is qcow2 over
    the previous, with the backing format recorded. Returns the paths, bottom first."""
    paths: list[Path] = []
    for name, size, writes in layers:
        path = directory / name
        fmt = "raw" if name.endswith(".raw") else "qcow2"
        if paths:
            below = paths[-1]
            below_fmt = "raw" if below.name.endswith(".raw") else "qcow2"
            qemu_img("create", "-f", fmt, "-b", below.name, "-F", below_fmt, path, str(size), check=True)
        else:
            qemu_img("create", "-f", fmt, path, str(size), check=True)
        for pattern, offset, length in writes:
            _io(path, fmt, f"write -P {pattern} {offset} {length}")
        paths.append(path)
    return paths


def make_s3(directory: Path, size: int = 1 * MiB) -> dict[str, Path]:
    """S3: base raw (0x01 at [0,512)) <- mid qcow2 (0x01 at [512K,512K+512)) <- top qcow2, empty.

    `size` other than 1 MiB gives the same layout on a bigger base (a stream
    then takes more than one 1 MiB chunk, so a throttle can hold it)."""
    base, mid, top = make_chain(directory, [
        ("base.raw", size, [(0x01, 0, 512)]),
        ("mid.qcow2", size, [(0x01, 512 * KiB, 512)]),
        ("top.qcow2", size, []),
    ])
    return {"base": base, "mid": mid, "top": top}


def make_c3(directory: Path) -> dict[str, Path]:
    """C3: base raw 2 MiB (0xab at [0,512K)) <- mid qcow2 (0xef at [512K,1M)) <- top qcow2, empty."""
    base, mid, top = make_chain(directory, [
        ("base.raw", 2 * MiB, [(0xAB, 0, 512 * KiB)]),
        ("mid.qcow2", 2 * MiB, [(0xEF, 512 * KiB, 512 * KiB)]),
        ("top.qcow2", 2 * MiB, []),
    ])
    return {"base": base, "mid": mid, "top": top}


P9_DATA = {7: (0, 2 * MiB), 5: (4 * MiB, 4 * MiB), 3: (8 * MiB, 2 * MiB), 1: (12 * MiB, 4 * MiB)}


def make_p9(directory: Path) -> dict[str, Path]:
    """P9: img-0 raw 16 MiB <- img-1 <- ... <- img-8 (qcow2); 0xFF in img-7 [0,2M),
    img-5 [4M,8M), img-3 [8M,10M), img-1 [12M,16M); even images empty."""
    layers = [("img-0.raw", 16 * MiB, [])]
    for i in range(1, 9):
        writes = [(0xFF, *P9_DATA[i])] if i in P9_DATA else []
        layers.append((f"img-{i}.qcow2", 16 * MiB, writes))
    paths = make_chain(directory, layers)
    return {f"img-{i}": p for i, p in enumerate(paths)}


# -- what qemu-img says about an image -------------------------------------------


def info(image: Path) -> dict[str, Any]:
    """`qemu-img info --output json` of one image (-U: a mount may hold its locks)."""
    proc = qemu_img("info", "-U", "--output", "json", image, check=True)
    return json.loads(proc.stdout)


def backing_of(image: Path) -> tuple[str | None, str | None]:
    """(real path of the backing file named in the header, recorded format), or (None, None)."""
    data = info(image)
    name = data.get("backing-filename")
    if name is None:
        return None, data.get("backing-filename-format")
    return os.path.realpath(os.path.join(image.parent, name)), data.get("backing-filename-format")


def assert_backing(image: Path, expected: Path | None, fmt: str | None = None) -> None:
    """The header of `image` names `expected` (with format `fmt`), or nothing at all."""
    name, recorded = backing_of(image)
    if expected is None:
        assert (name, recorded) == (None, None), f"{image.name} still names a backing: {name} ({recorded})"
    else:
        assert name == os.path.realpath(expected), f"{image.name} names {name}, not {expected}"
        assert recorded == fmt, f"{image.name}: backing format {recorded}, not {fmt}"


def own_map(image: Path) -> list[dict[str, Any]]:
    """The extents `image` itself stores (depth 0 of `qemu-img map`): a raw
    image stores everything, a qcow2 image its allocated and zero clusters."""
    fmt = "raw" if image.name.endswith(".raw") else "qcow2"
    proc = qemu_img("map", "-U", "-f", fmt, "--output=json", image, check=True)
    return [e for e in json.loads(proc.stdout) if e["depth"] == 0 and e["present"]]


def merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, coalesced (start, end) ranges."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and out[-1][1] >= start:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        elif end > start:
            out.append((start, end))
    return out


def presence(image: Path) -> list[tuple[int, int]]:
    """Where `image` itself stores data or zeros, as merged (start, end) ranges."""
    return merge([(e["start"], e["start"] + e["length"]) for e in own_map(image)])


def cluster_size(image: Path) -> int:
    return int(info(image).get("cluster-size", 512))


def assert_zero_extents_read_zero(image: Path, content: bytes | bytearray) -> None:
    """Every extent `image` stores as zeros (zero clusters, holes of a raw
    file) reads as zeros in the guest content: imgchain stores zero data as
    zero clusters, so only this (not the zero/data flags) is compared."""
    for e in own_map(image):
        if e["zero"]:
            piece = content[e["start"]:e["start"] + e["length"]]
            assert piece.count(0) == len(piece), f"{image.name}: zero extent at {e['start']} reads non-zero"


def guest_content(image: Path) -> bytes:
    """The guest-visible bytes of `image` with its backing chain (qemu-img convert to raw)."""
    out = image.parent / f".{image.name}.content"
    fmt = "raw" if image.name.endswith(".raw") else "qcow2"
    qemu_img("convert", "-U", "-f", fmt, "-O", "raw", image, out, check=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- QMP ---------------------------------------------------------------------------


def socket_of(disk: Path) -> str:
    from imgchain.runtime import find_by_mountpoint
    record = find_by_mountpoint(str(disk))
    assert record is not None, f"no mount record for {disk}"
    return record.socket


class Qmp:
    """A qemu.qmp session that keeps every event it receives, in order."""

    def __init__(self) -> None:
        self.client = QMPClient("jobs-test")
        self.listener = EventListener()
        self.events: list[dict[str, Any]] = []  # {"event": name, "data": {...}}
        self._arrived = asyncio.Condition()
        self._pump: asyncio.Task[None] | None = None

    async def _collect(self) -> None:
        async for message in self.listener:
            async with self._arrived:
                self.events.append({"event": message["event"], "data": dict(message.get("data", {}))})
                self._arrived.notify_all()

    async def cmd(self, name: str, **args: Any) -> Any:
        return await self.client.execute(name, args or None)

    async def error(self, name: str, **args: Any) -> str:
        """Run a command that must fail; its error description."""
        return (await self.failure(name, **args))[1]

    async def failure(self, name: str, **args: Any) -> tuple[str, str]:
        """Run a command that must fail; (error class, description)."""
        try:
            result = await self.client.execute(name, args or None)
        except ExecuteError as exc:
            return exc.error_class, str(exc)
        raise AssertionError(f"{name} {args} succeeded ({result}) but should have failed")

    def mark(self) -> int:
        """A position in the event log: waits can look only at events after it."""
        return len(self.events)

    def find(self, name: str, since: int = 0, **match: Any) -> dict[str, Any] | None:
        for event in self.events[since:]:
            if event["event"] == name and all(event["data"].get(k) == v for k, v in match.items()):
                return event["data"]
        return None

    async def wait_event(self, name: str, since: int = 0, timeout: float = TIMEOUT, **match: Any) -> dict[str, Any]:
        """The first event `name` (after `since`) whose data has the `match` items; waits for it."""
        async def arrived() -> dict[str, Any]:
            async with self._arrived:
                while (found := self.find(name, since, **match)) is None:
                    await self._arrived.wait()
                return found
        try:
            return await asyncio.wait_for(arrived(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"no {name} {match} within {timeout} s; events: {self.events[since:]}") from None

    async def wait_job_end(self, job_id: str, since: int = 0) -> tuple[str, dict[str, Any]]:
        """(event name, data) of the job's BLOCK_JOB_COMPLETED or BLOCK_JOB_CANCELLED."""
        async def either() -> tuple[str, dict[str, Any]]:
            async with self._arrived:
                while True:
                    for name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
                        found = self.find(name, since, device=job_id)
                        if found is not None:
                            return name, found
                    await self._arrived.wait()
        try:
            return await asyncio.wait_for(either(), TIMEOUT)
        except asyncio.TimeoutError:
            raise AssertionError(f"job {job_id} did not end; events: {self.events[since:]}") from None

    async def run_job(self, command: str, job_id: str, **args: Any) -> dict[str, Any]:
        """Start a job, wait until it completes without error and is dismissed; its COMPLETED data."""
        since = self.mark()
        await self.cmd(command, **args)
        name, data = await self.wait_job_end(job_id, since)
        assert name == "BLOCK_JOB_COMPLETED" and "error" not in data, f"{job_id}: {name} {data}"
        await self.wait_event("JOB_STATUS_CHANGE", since, id=job_id, status="null")
        return data

    def statuses(self, job_id: str, since: int = 0) -> list[str]:
        return [e["data"]["status"] for e in self.events[since:]
                if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job_id]

    async def job(self, job_id: str) -> dict[str, Any] | None:
        """The job's query-block-jobs entry, or None."""
        return next((j for j in await self.cmd("query-block-jobs") if j["device"] == job_id), None)

    async def wait_job(self, job_id: str, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Poll query-block-jobs until the job's entry satisfies `predicate`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while True:
            entry = await self.job(job_id)
            if entry is not None and predicate(entry):
                return entry
            assert loop.time() < deadline, f"job {job_id} never got there: {entry}; events: {self.events}"
            await asyncio.sleep(0.02)

    async def chain(self) -> list[str]:
        """Node names of the device's chain, top first (query-named-block-nodes)."""
        return [n["node-name"] for n in await self.cmd("query-named-block-nodes")]

    async def node(self, name: str) -> dict[str, Any]:
        return next(n for n in await self.cmd("query-named-block-nodes") if n["node-name"] == name)


@asynccontextmanager
async def qmp_session(disk: Path) -> AsyncIterator[Qmp]:
    qmp = Qmp()
    qmp.client.register_listener(qmp.listener)
    await qmp.client.connect(socket_of(disk))
    qmp._pump = asyncio.create_task(qmp._collect())
    try:
        yield qmp
    finally:
        qmp._pump.cancel()
        await qmp.client.disconnect()


# -- the verifying writer ------------------------------------------------------------


class VerifyingWriter(threading.Thread):
    """Writes random blocks to the mounted file and checks what it reads back.

    The model starts as the guest content before the mount and follows every
    write; after each write the block is re-read, and so is a random other
    range, both compared with the model. `regions` limits where it writes
    and `read_regions` where it reads besides its own blocks. `touched`
    lists the written ranges, so a test can allow for them in an image's
    allocation map."""

    def __init__(self, disk: Path, model: bytes, regions: list[tuple[int, int]] | None = None,
                 seed: int = 0, block: int = 4 * KiB, read_regions: list[tuple[int, int]] | None = None) -> None:
        super().__init__(daemon=True)
        self.disk = disk
        self.model = bytearray(model)
        self.regions = regions or [(0, len(model))]
        self.read_regions = read_regions or [(0, len(model))]
        self.rng = random.Random(seed)
        self.block = block
        self.stop_event = threading.Event()
        self.errors: list[str] = []
        self.writes = 0
        self.reads = 0
        self.touched: list[tuple[int, int]] = []
        self._stepping = threading.Lock()  # held for one write and its checks
        self._resumed = threading.Event()
        self._resumed.set()

    def pause(self) -> None:
        """Stop writing (returns once no write is under way)."""
        self._resumed.clear()
        with self._stepping:
            pass

    def resume(self) -> None:
        self._resumed.set()

    def snapshot(self) -> bytes:
        """The model now (pause first for a stable one)."""
        return bytes(self.model)

    def run(self) -> None:
        fd = os.open(self.disk, os.O_RDWR)
        try:
            while not self.stop_event.is_set() and len(self.errors) < 5:
                if not self._resumed.wait(0.05):
                    continue
                with self._stepping:
                    if self._resumed.is_set():
                        self._step(fd)
        except OSError as exc:
            self.errors.append(f"I/O error on the mount: {exc}")
        finally:
            os.close(fd)

    def _step(self, fd: int) -> None:
        start, end = self.rng.choice(self.regions)
        blocks = self.rng.randint(1, 4)
        offset = start + self.rng.randrange(0, max(1, (end - start) // self.block - blocks + 1)) * self.block
        length = min(blocks * self.block, end - offset)
        data = self.rng.randbytes(length)
        assert os.pwrite(fd, data, offset) == length
        self.model[offset:offset + length] = data
        self.touched.append((offset, offset + length))
        self.writes += 1
        self._check(fd, offset, length)
        start, end = self.rng.choice(self.read_regions)
        other = start + self.rng.randrange(0, max(1, (end - start) // self.block)) * self.block
        self._check(fd, other, min(64 * KiB, end - other))

    def _check(self, fd: int, offset: int, length: int) -> None:
        got = os.pread(fd, length, offset)
        self.reads += 1
        want = bytes(self.model[offset:offset + length])
        if got != want:
            first = next(i for i in range(min(len(got), len(want))) if got[i] != want[i]) \
                if len(got) == len(want) else 0
            self.errors.append(f"read [{offset}, +{length}) differs from the model at byte {offset + first}")

    def touched_clusters(self, cluster: int) -> list[tuple[int, int]]:
        return merge([(s // cluster * cluster, -(-e // cluster) * cluster) for s, e in self.touched])

    def finish(self) -> bytes:
        """Stop, check that it wrote and saw only the model; the final model."""
        self.stop_event.set()
        self.join(TIMEOUT)
        assert not self.is_alive(), "the writer hangs on the mount"
        assert not self.errors, self.errors
        assert self.writes > 0, "the writer never wrote"
        return bytes(self.model)

    async def warm_up(self, writes: int = 20) -> None:
        """Wait (without blocking the event loop) until it has written `writes` blocks."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while self.writes < writes and not self.errors:
            assert self.is_alive(), "the writer died"
            assert loop.time() < deadline, "the writer makes no progress"
            await asyncio.sleep(0.01)
