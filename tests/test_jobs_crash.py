"""kill -9 of a mount's daemon while a stream or an intermediate commit runs.

A chain base.qcow2 <- mid.qcow2 <- top.qcow2 (16 MiB, every 4 KiB block
tagged with its layer and index) is mounted; a guest writer writes and
fsyncs through the mount while a throttled job (stream of top down to base,
or commit of mid into base) runs over QMP; the daemon is killed with SIGKILL:

- at a few seeded random moments of the copy;
- inside prepare, before the graph change: a guest read held by a blkdebug
  delay is in flight when job-finalize starts prepare, whose drain waits for
  it (status pending after finalize);
- right after the header rewrite: the test polls the backing name in top's
  header (a tight pread loop, faster than `qemu-img info -U`) and kills the
  moment it changes; the rewrite is one pwrite of cluster 0, so a kill
  cannot land inside it: before (previous case) and after (this one) are the
  two states the disk can hold;
- right after BLOCK_JOB_COMPLETED.

Afterwards `imgchain unmount` detaches the dead mount, every image passes
`qemu-img check` (exit 0, or 3 for leaked clusters), the chain the headers
describe shows the expected content (read with imgchain and with
`qemu-img compare` against a raw copy of the model), and mounting again and
running the same job completes it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

import imgchain
from imgchain.create import create_image

from .conftest import qemu_img
from .mounting import cli, is_mountpoint, mounted_pid, require_fuse
from .test_lifecycle import wait_dead
from .test_qmp import socket_of

MiB = 1 << 20
SIZE = 16 * MiB
BLOCK = 4096
CLUSTER = 64 << 10
SECTOR = 512
HELD_READ = 15 * MiB + 8 * BLOCK  # the guest read a blkdebug rule holds (a block nobody writes)


# -- the chain and its model ---------------------------------------------------

def block(layer: int, index: int) -> bytes:
    return struct.pack("<II", layer, index) * (BLOCK // 8)


def layers() -> dict[str, list[int]]:
    """Which 64 KiB clusters each layer stores."""
    clusters = range(SIZE // CLUSTER)
    return {"base": list(clusters),
            "mid": [c for c in clusters if c % 3 != 0 and c < 12 * MiB // CLUSTER],
            "top": [c for c in clusters if c % 5 == 0 and c < 15 * MiB // CLUSTER]}


def cluster_data(layer: int, cluster: int) -> bytes:
    first = cluster * CLUSTER // BLOCK
    return b"".join(block(layer, first + i) for i in range(CLUSTER // BLOCK))


def build_chain(d: Path) -> bytearray:
    """Create the chain in `d`; returns its guest-visible content."""
    model = bytearray(SIZE)
    create_image(str(d / "base.qcow2"), "qcow2", SIZE)
    create_image(str(d / "mid.qcow2"), backing_file="base.qcow2", backing_format="qcow2")
    create_image(str(d / "top.qcow2"), backing_file="mid.qcow2", backing_format="qcow2")
    for layer, name in enumerate(("base", "mid", "top"), start=1):
        with imgchain.open_chain(d / f"{name}.qcow2", writable=True) as chain:
            for c in layers()[name]:
                data = cluster_data(layer, c)
                chain.write(c * CLUSTER, data)
                model[c * CLUSTER:(c + 1) * CLUSTER] = data
    return model


def chain_names(top: Path) -> list[str]:
    proc = qemu_img("info", "-U", "--backing-chain", "--output", "json", top, check=True)
    return [Path(i["filename"]).stem for i in json.loads(proc.stdout)]


def backing_name(path: Path) -> bytes:
    """The backing file name in a qcow2 header, read straight from the file."""
    with open(path, "rb") as f:
        head = f.read(BLOCK)
    offset, size = struct.unpack(">QI", head[8:20])
    return head[offset:offset + size]


# -- a minimal QMP client that keeps the events ----------------------------------

class Qmp:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        assert "QMP" in self._receive()
        self.cmd("qmp_capabilities")

    def _receive(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line, "the daemon closed the QMP connection"
        return json.loads(line)

    def cmd(self, name: str, **args: Any) -> Any:
        self.sock.sendall(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        while True:
            reply = self._receive()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise AssertionError(f"{name}: {reply['error']}")
            else:
                return reply["return"]

    def wait_event(self, name: str) -> dict[str, Any]:
        while True:
            found = [e for e in self.events if e["event"] == name]
            if found:
                return found[0]
            self.events.append(self._receive())

    def close(self) -> None:
        self.file.close()
        self.sock.close()


JOBS = {"stream": ("block-stream", {"device": "drive0", "base-node": "base"}),
        "commit": ("block-commit", {"device": "drive0", "top-node": "mid", "base-node": "base"})}


def start_job(qmp: Qmp, kind: str, **extra: Any) -> None:
    command, args = JOBS[kind]
    qmp.cmd(command, **args, **extra)


def job_status(qmp: Qmp) -> dict[str, Any] | None:
    jobs = qmp.cmd("query-block-jobs")
    return jobs[0] if jobs else None


# -- the mount, the writer, the kill -------------------------------------------

def mount_chain(top: Path, disk: Path, rules: list[dict[str, Any]] | None = None) -> None:
    require_fuse()
    env = dict(os.environ)
    if rules:
        path = top.parent / "blkdebug.json"
        path.write_text(json.dumps(rules))
        env["IMGCHAIN_BLKDEBUG"] = str(path)
    proc = cli("mount", top, disk, env=env)
    assert proc.returncode == 0, proc.stderr


class Writer(threading.Thread):
    """Writes 4 KiB blocks through the mount, each followed by fsync; the
    model gets every write whose fsync returned; the one under way when the
    daemon dies may or may not have landed (sector by sector)."""

    def __init__(self, disk: Path, model: bytearray, seed: int) -> None:
        super().__init__(daemon=True)
        self.fd = os.open(disk, os.O_RDWR)
        self.model = model
        self.rng = random.Random(seed)
        self.pending: tuple[int, bytes] | None = None
        self.done = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopped.is_set():
                offset = self.rng.randrange(0, 15 * MiB // BLOCK) * BLOCK
                data = block(9, self.done)
                self.pending = (offset, data)
                os.pwrite(self.fd, data, offset)
                os.fsync(self.fd)
                self.model[offset:offset + BLOCK] = data
                self.pending = None
                self.done += 1
                time.sleep(0.005)
        except OSError:
            pass  # the daemon died under the write
        finally:
            try:
                os.close(self.fd)
            except OSError:
                pass  # the dead mount's release fails too

    def finish(self) -> None:
        self.stopped.set()
        if self.ident is not None:
            self.join(30)
        assert not self.is_alive()


def kill_daemon(disk: Path) -> None:
    os.kill(mounted_pid(disk), signal.SIGKILL)
    wait_dead(disk)


def detach(disk: Path) -> None:
    proc = cli("unmount", disk)
    assert proc.returncode == 0, proc.stderr
    assert "had died; detached the dead mount" in proc.stderr
    assert not is_mountpoint(disk)


def assert_intact(d: Path, model: bytearray, pending: tuple[int, bytes] | None) -> list[str]:
    """Every image checks clean or leaking only; the chain the headers
    describe shows the model (the write under way at the kill: old or new
    bytes, sector by sector). Returns the chain's names."""
    for name in ("base", "mid", "top"):
        proc = qemu_img("check", d / f"{name}.qcow2")
        assert proc.returncode in (0, 3), f"{name}: {proc.returncode} {proc.stdout}{proc.stderr}"
    names = chain_names(d / "top.qcow2")
    with imgchain.open_chain(d / "top.qcow2") as chain:
        content = bytearray(chain.read(0, SIZE))
    if pending is not None:
        offset, data = pending
        for at in range(offset, offset + BLOCK, SECTOR):
            got = content[at:at + SECTOR]
            assert got in (model[at:at + SECTOR], data[at - offset:at - offset + SECTOR]), at
        model[offset:offset + BLOCK] = content[offset:offset + BLOCK]  # what landed is the model now
    assert content == model, first_difference(content, model)
    reference = d / "model.raw"
    reference.write_bytes(model)
    proc = qemu_img("compare", "-f", "qcow2", "-F", "raw", d / "top.qcow2", reference)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return names


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> str:
    at = next(i for i in range(len(a)) if a[i] != b[i])
    return f"first difference at {at}: {bytes(a[at:at + 8]).hex()} != {bytes(b[at:at + 8]).hex()}"


def restart_to_completion(d: Path, disk: Path, kind: str, model: bytearray) -> None:
    """Mount again; if the chain still holds mid, run the same job to its end."""
    top = d / "top.qcow2"
    mount_chain(top, disk)
    try:
        qmp = Qmp(socket_of(disk))
        if "mid" in chain_names(top):
            start_job(qmp, kind)
            event = qmp.wait_event("BLOCK_JOB_COMPLETED")
            assert "error" not in event["data"], event
        assert job_status(qmp) is None
        qmp.close()
        with open(disk, "rb") as f:
            assert f.read() == model
    finally:
        done = cli("unmount", disk)
    assert done.returncode == 0, done.stderr
    assert assert_intact(d, model, None) == ["top", "base"]


# -- the cases -------------------------------------------------------------------

def run_case(d: Path, kind: str, moment: str, seed: int) -> None:
    model = build_chain(d)
    top, disk = d / "top.qcow2", d / "disk.img"
    rules = None
    if moment == "in prepare":  # a guest read of HELD_READ stays in flight for 20 s
        rules = [{"image": "top", "op": "read", "offset": HELD_READ, "length": BLOCK, "delay_ms": 20000}]
    mount_chain(top, disk, rules)
    qmp = Qmp(socket_of(disk))
    writer = Writer(disk, model, seed)
    writer.start()
    reader: threading.Thread | None = None
    header = backing_name(top)
    expect_changed: bool | None = None
    held: list[str] = []
    try:
        if moment.startswith("at "):
            start_job(qmp, kind, speed=1 * MiB)  # about 6 s for this chain
            time.sleep(float(moment[3:]))
            status = job_status(qmp)
            assert status is not None and status["status"] == "running" and status["offset"] < status["len"]
            expect_changed = False
        elif moment == "in prepare":
            start_job(qmp, kind, **{"auto-finalize": False})
            qmp.wait_event("BLOCK_JOB_PENDING")
            reader = threading.Thread(target=read_held, args=(disk, held), daemon=True)
            reader.start()
            time.sleep(0.5)  # the read reaches the daemon and waits out its delay there
            assert reader.is_alive()
            qmp.cmd("job-finalize", id="drive0")  # prepare's drain now waits for that read
            time.sleep(0.3)
            assert job_status(qmp)["status"] == "pending"
            assert backing_name(top) == header
            expect_changed = False
        elif moment == "after the header rewrite":
            start_job(qmp, kind)
            deadline = time.monotonic() + 60
            while backing_name(top) == header:
                assert time.monotonic() < deadline, "the header never changed"
            expect_changed = True
        elif moment == "after BLOCK_JOB_COMPLETED":
            start_job(qmp, kind)
            event = qmp.wait_event("BLOCK_JOB_COMPLETED")
            assert "error" not in event["data"], event
            expect_changed = True
        else:
            raise AssertionError(moment)
        kill_daemon(disk)
        writer.finish()
        if reader is not None:
            reader.join(30)
            assert held and held[0] != "answered", held  # the drain was still waiting for it
        detach(disk)
    finally:
        writer.finish()
        qmp.close()
        if is_mountpoint(disk):  # the test failed before the kill
            cli("unmount", disk)
    assert writer.done > 0  # the guest wrote through the mount while the job ran
    changed = backing_name(top) != header
    assert changed == expect_changed, (moment, backing_name(top), header)
    names = assert_intact(d, model, writer.pending)
    assert names == (["top", "base"] if changed else ["top", "mid", "base"])
    restart_to_completion(d, disk, kind, model)


def read_held(disk: Path, outcome: list[str]) -> None:
    """The held guest read: the daemon dies before it is answered."""
    fd = os.open(disk, os.O_RDONLY)
    try:
        os.pread(fd, BLOCK, HELD_READ)
        outcome.append("answered")
    except OSError as exc:
        outcome.append(os.strerror(exc.errno or 0))
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # the dead mount's release fails too


RANDOM_MOMENTS = [f"at {random.Random(seed).uniform(0.1, 2.5):.2f}" for seed in (1, 2)]


@pytest.mark.parametrize("moment", [*RANDOM_MOMENTS, "in prepare", "after the header rewrite",
                                    "after BLOCK_JOB_COMPLETED"])
@pytest.mark.parametrize("kind", ["stream", "commit"])
def test_kill_9_during_a_job(tmp_path: Path, kind: str, moment: str) -> None:
    run_case(tmp_path, kind, moment, seed=zlib.crc32(f"{kind} {moment}".encode()))
