"""Jobs on a live mount under load, and kill -9 in the middle of them (issue 10 point 6).

- fio with crc32c verification (libaio, queue depth 16, four jobs) writes to
  the mount throughout a live snapshot, a stream, an intermediate commit and
  an active commit with its pivot; afterwards fio found no wrong byte, every
  image passes `qemu-img check`, the content the daemon showed is the
  content of the chain on disk, and the chain on disk (headers) is the chain
  the daemon had.
- kill -9 of the daemon before READY, after READY and during the pivot of an
  active commit, and during a snapshot, while a writer fsyncs every block it
  writes: every image passes `qemu-img check` (0 or 3) and every fsync'd byte
  reads back from the chain the headers describe, starting at the image the
  daemon's record names (the record follows the device through a pivot or a
  snapshot before any later request is served).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import imgchain
from imgchain.create import create_image
from imgchain.qmp_client import QmpClient
from imgchain.runtime import find_by_mountpoint

from .conftest import qemu_img
from .mounting import cli, mount, mounted_pid, wait_gone

MIB = 1 << 20


def chain(tmp: Path, size: int) -> Path:
    """base.raw (patterned) <- mid.qcow2 (some data) <- top.qcow2 (4 KiB clusters)."""
    with open(tmp / "base.raw", "wb") as f:
        f.write(bytes(range(256)) * (size // 256))
    create_image(str(tmp / "mid.qcow2"), "qcow2", size, "base.raw", "raw")
    with imgchain.open_chain(tmp / "mid.qcow2", writable=True) as c:
        for off in range(0, size, size // 8):
            c.write(off + 1000, b"\x33" * 50_000)
    create_image(str(tmp / "top.qcow2"), "qcow2", size, "mid.qcow2", "qcow2", 4096)
    return tmp / "top.qcow2"


class Qmp:
    def __init__(self, disk: Path) -> None:
        record = find_by_mountpoint(str(disk))
        assert record is not None
        self.client = QmpClient(record.socket, timeout=120)

    def run(self, command: str, **args: object) -> object:
        return self.client.execute(command, **args)

    def wait_event(self, name: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.client.events:
                if event["event"] == name:
                    self.client.events.remove(event)
                    return event
            self.client.execute("query-version")  # collects the events that arrived
            time.sleep(0.02)
        raise AssertionError(f"no {name} within {timeout} s")

    def job(self, command: str, **args: object) -> dict:
        self.run(command, **args)
        event = self.wait_event("BLOCK_JOB_COMPLETED")
        assert "error" not in event["data"], event
        return event


def headers_chain(top: Path) -> list[Path]:
    info = json.loads(qemu_img("info", "--backing-chain", "--output", "json", "-U", top, check=True).stdout)
    return [Path(i["filename"]).resolve() for i in info]


def chain_md5(top: Path) -> str:
    out = top.parent / "flat.raw"
    qemu_img("convert", "-U", "-O", "raw", top, out, check=True)
    try:
        return hashlib.md5(out.read_bytes()).hexdigest()
    finally:
        out.unlink()


def test_every_job_and_a_snapshot_under_fio_verify(tmp_path: Path) -> None:
    top = chain(tmp_path, 32 * MIB)
    disk = tmp_path / "disk.img"
    with mount(top, disk):
        fio = subprocess.Popen(
            ["fio", "--name=load", f"--filename={disk}", "--direct=1", "--ioengine=libaio", "--iodepth=16",
             "--rw=randwrite", "--bs=4k", "--size=8M", "--numjobs=4", "--offset_increment=8M",
             "--verify=crc32c", "--verify_backlog=512", "--verify_fatal=1", "--do_verify=1",
             "--verify_state_save=0", "--time_based", "--runtime=25", "--group_reporting", "--randrepeat=0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            q = Qmp(disk)
            time.sleep(1)
            q.run("blockdev-snapshot-sync", device="drive0", **{"snapshot-file": str(tmp_path / "snap.qcow2")})
            q.job("block-stream", device="top", **{"base-node": "base", "job-id": "s"})
            q.job("block-commit", device="drive0", **{"top-node": "top", "base-node": "base", "job-id": "c"})
            q.run("block-commit", device="drive0", **{"base-node": "base", "job-id": "a"})
            q.wait_event("BLOCK_JOB_READY")
            time.sleep(1)
            q.job("block-job-complete", device="a")
            assert q.run("query-block")[0]["inserted"]["node-name"] == "base"  # type: ignore[index]
            out, _ = fio.communicate(timeout=300)
        finally:
            if fio.poll() is None:
                fio.kill()
        assert fio.returncode == 0, out
        assert "err= 0" in out, out
        seen = hashlib.md5(disk.read_bytes()).hexdigest()
        mounts = json.loads(cli("mounts", "--output", "json").stdout)
        assert Path(mounts[0]["image"]).resolve() == (tmp_path / "base.raw").resolve()
    assert hashlib.md5((tmp_path / "base.raw").read_bytes()).hexdigest() == seen
    assert headers_chain(tmp_path / "snap.qcow2") == [(tmp_path / n).resolve() for n in ("snap.qcow2", "base.raw")]
    for name in ("snap.qcow2", "top.qcow2", "mid.qcow2"):
        proc = qemu_img("check", tmp_path / name)
        assert proc.returncode == 0, proc.stdout


class FsyncWriter(threading.Thread):
    """Writes random 4 KiB blocks through the mount, fsyncs each; the model
    holds only what an fsync acknowledged."""

    def __init__(self, disk: Path, size: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.disk, self.size, self.rng = disk, size, random.Random(seed)
        self.model: dict[int, bytes] = {}
        self.in_flight: tuple[int, bytes] | None = None  # written, not yet acknowledged by fsync
        self.stop = threading.Event()
        self.failed: OSError | None = None

    def run(self) -> None:
        try:
            fd = os.open(self.disk, os.O_RDWR)
        except OSError as exc:
            self.failed = exc
            return
        try:
            while not self.stop.is_set():
                offset = self.rng.randrange(0, self.size // 4096) * 4096
                data = self.rng.randbytes(4096)
                self.in_flight = (offset, data)
                os.pwrite(fd, data, offset)
                os.fsync(fd)
                self.model[offset] = data
                self.in_flight = None
        except OSError as exc:  # the daemon was killed
            self.failed = exc
        finally:
            try:
                os.close(fd)
            except OSError:
                pass


def kill_and_check(tmp_path: Path, disk: Path, writer: FsyncWriter, images: list[str]) -> None:
    pid = mounted_pid(disk)
    record = find_by_mountpoint(str(disk))
    assert record is not None
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    writer.stop.set()
    writer.join(timeout=60)
    with open(record.path) as f:
        device_image = Path(json.load(f)["image"])  # where the device was when it died
    assert cli("unmount", disk).returncode == 0
    for name in images:
        if name.endswith(".qcow2") and (tmp_path / name).exists():
            rc = qemu_img("check", tmp_path / name).returncode
            assert rc in (0, 3), f"{name}: qemu-img check exit {rc}"
    with imgchain.open_chain(device_image) as c:
        for offset, data in writer.model.items():
            got = c.read(offset, 4096)
            newer = writer.in_flight is not None and writer.in_flight[0] == offset and got == writer.in_flight[1]
            assert got == data or newer, f"fsync'd block at {offset} lost ({device_image.name})"


@pytest.mark.parametrize("moment", ["before-ready", "after-ready", "during-pivot"])
def test_kill_9_during_an_active_commit(tmp_path: Path, moment: str) -> None:
    top = chain(tmp_path, 16 * MIB)
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"image": "top", "op": "read", "offset": 15 * MIB, "length": 512,
                                  "delay_ms": 30_000, "once": True}]))
    disk = tmp_path / "disk.img"
    os.environ["IMGCHAIN_BLKDEBUG"] = str(rules)
    try:
        with mount(top, disk):
            os.environ.pop("IMGCHAIN_BLKDEBUG")
            writer = FsyncWriter(disk, 16 * MIB, seed=len(moment))
            writer.start()
            q = Qmp(disk)
            speed = 256 * 1024 if moment == "before-ready" else 0
            q.run("block-commit", device="drive0", **{"base-node": "base", "speed": speed})
            if moment == "before-ready":
                time.sleep(random.uniform(0.2, 1.0))
                assert q.run("query-block-jobs")[0]["status"] == "running"  # type: ignore[index]
            else:
                q.wait_event("BLOCK_JOB_READY")
                time.sleep(random.uniform(0.1, 0.5))
            if moment == "during-pivot":
                slow = threading.Thread(target=lambda: _read_quietly(disk, 15 * MIB), daemon=True)
                slow.start()  # in flight for 30 s: the pivot's drain waits for it
                time.sleep(0.3)
                q.run("block-job-complete", device="drive0")
                time.sleep(0.3)
                assert q.run("query-block")[0]["inserted"]["node-name"] == "top"  # type: ignore[index]
            kill_and_check(tmp_path, disk, writer, ["top.qcow2", "mid.qcow2"])
    finally:
        os.environ.pop("IMGCHAIN_BLKDEBUG", None)


def _read_quietly(disk: Path, offset: int) -> None:
    try:
        fd = os.open(disk, os.O_RDONLY)
        try:
            os.pread(fd, 512, offset)
        finally:
            os.close(fd)
    except OSError:
        pass


def test_kill_9_right_after_a_snapshot(tmp_path: Path) -> None:
    top = chain(tmp_path, 16 * MIB)
    disk = tmp_path / "disk.img"
    with mount(top, disk):
        writer = FsyncWriter(disk, 16 * MIB, seed=7)
        writer.start()
        time.sleep(0.3)
        q = Qmp(disk)
        q.run("blockdev-snapshot-sync", device="drive0", **{"snapshot-file": str(tmp_path / "snap.qcow2")})
        time.sleep(random.uniform(0.05, 0.5))
        kill_and_check(tmp_path, disk, writer, ["snap.qcow2", "top.qcow2", "mid.qcow2"])
    assert headers_chain(tmp_path / "snap.qcow2")[:2] == [(tmp_path / "snap.qcow2").resolve(), top.resolve()]
