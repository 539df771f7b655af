"""The job CLI: `imgchain stream`, `commit`, `jobs`, `job ...`, on mounted chains (the job runs in
the daemon) and offline (in the CLI process; commit with qemu-img commit's semantics, checked
against the real qemu-img on the same chain: BLOCK-JOBS.md scenario 25)."""

from __future__ import annotations

import json
import mmap
import os
import pty
import random
import select
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests.conftest import assert_qemu_clean, qemu_img, qemu_io, wait_until_write_locked
from tests.mounting import IMGCHAIN, cli, mount

MiB = 1 << 20
BLOCK = 4096


def qio(image: Path, *commands: str, fmt: str = "qcow2") -> None:
    proc = qemu_io(image, *commands, fmt=fmt)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


def make_chain(d: Path, size_mib: int = 16) -> Path:
    """base.raw <- mid.qcow2 <- top.qcow2 (4 KiB clusters), data in every layer,
    zero clusters in top; returns top."""
    base, mid, top = d / "base.raw", d / "mid.qcow2", d / "top.qcow2"
    qemu_img("create", "-q", "-f", "raw", base, f"{size_mib}M", check=True)
    qio(base, f"write -P 0xab 0 {size_mib // 2}M", fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, check=True)
    qio(mid, f"write -P 0xcd {size_mib // 4}M {size_mib // 4}M", "write -P 0x11 1M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "mid.qcow2", "-F", "qcow2",
             top, check=True)
    qio(top, "write -P 0xef 512k 1M", "write -z 3M 1M", f"write -P 0x01 {size_mib - 1}M 4k", "write -P 0x02 6000 300")
    return top


def clone(src: Path, dst: Path) -> None:
    """A copy of the chain's folder, holes kept (a raw file's map shows them)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            subprocess.run(["cp", "--sparse=always", f, dst / f.name], check=True)


def same_content(a: Path, b: Path, fmt_a: str | None = None, fmt_b: str | None = None) -> None:
    argv = ["compare"]
    if fmt_a:
        argv += ["-f", fmt_a]
    if fmt_b:
        argv += ["-F", fmt_b]
    proc = qemu_img(*argv, a, b)
    assert proc.returncode == 0, f"{a} vs {b}: {proc.stdout}{proc.stderr}"


def chain_map(image: Path) -> list[dict]:
    """qemu-img map of the chain, without host offsets (file layouts may differ)."""
    proc = subprocess.run(["qemu-img", "map", "--output=json", image.name], cwd=image.parent,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [{k: v for k, v in e.items() if k != "offset"} for e in json.loads(proc.stdout)]


def own_allocation(image: Path) -> list[tuple[int, int, bool]]:
    """The image's own allocation: (start, length, zero) of the depth-0 extents, merged."""
    out: list[tuple[int, int, bool]] = []
    for e in chain_map(image):
        if e["depth"] != 0 or not e["present"]:
            continue
        if out and out[-1][0] + out[-1][1] == e["start"] and out[-1][2] == e["zero"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], e["zero"])
        else:
            out.append((e["start"], e["length"], e["zero"]))
    return out


def backing_of(image: Path) -> str | None:
    """The file name of the image's backing file as its header names it (relative or not)."""
    info = json.loads(qemu_img("info", "--output=json", "-U", image, check=True).stdout)
    name = info.get("backing-filename")
    return None if name is None else os.path.basename(name)


def one_error_line(proc: subprocess.CompletedProcess[str], text: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("imgchain: error: ") and text in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def job_record_shape(record: dict, job_type: str) -> None:
    assert set(record) >= {"id", "type", "status", "current-progress", "total-progress"}, record
    assert record["type"] == job_type and record["status"] == "concluded"


# -- offline (scenario 25) ---------------------------------------------------------------

def test_offline_commit_matches_qemu_img_commit(tmp_path: Path) -> None:
    """imgchain commit top == qemu-img commit top: mid gets top's data, top is emptied
    (its map shows only what the backing has), content unchanged."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    top = make_chain(ours)
    clone(ours, theirs)
    proc = cli("commit", top)
    assert proc.returncode == 0, proc.stderr
    assert "emptied" in proc.stdout
    qemu_img("commit", "-q", theirs / "top.qcow2", check=True)
    same_content(top, theirs / "top.qcow2")
    same_content(ours / "mid.qcow2", theirs / "mid.qcow2")
    assert own_allocation(top) == own_allocation(theirs / "top.qcow2") == []
    assert chain_map(top) == chain_map(theirs / "top.qcow2")
    assert backing_of(top) == "mid.qcow2"
    assert_qemu_clean(top, ours / "mid.qcow2")


def test_offline_commit_keep_top_and_base_match_qemu_img(tmp_path: Path) -> None:
    """-d keeps top's data (qemu-img commit -d); --base B merges top..above-B into B and
    keeps top (qemu-img commit -b)."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    top = make_chain(ours)
    clone(ours, theirs)
    before = own_allocation(top)
    assert cli("commit", "-d", "-q", top).returncode == 0
    qemu_img("commit", "-q", "-d", theirs / "top.qcow2", check=True)
    same_content(ours / "mid.qcow2", theirs / "mid.qcow2")
    same_content(top, theirs / "top.qcow2")
    assert own_allocation(top) == before == own_allocation(theirs / "top.qcow2")
    assert_qemu_clean(top, ours / "mid.qcow2")

    base_ours, base_theirs = tmp_path / "b-ours", tmp_path / "b-theirs"
    base_ours.mkdir()
    top = make_chain(base_ours)
    clone(base_ours, base_theirs)
    before = own_allocation(top)
    proc = cli("commit", "--base", base_ours / "base.raw", "--output", "json", top)
    assert proc.returncode == 0, proc.stderr
    job_record_shape(json.loads(proc.stdout), "commit")
    qemu_img("commit", "-q", "-b", "base.raw", base_theirs / "top.qcow2", check=True)
    same_content(base_ours / "base.raw", base_theirs / "base.raw", "raw", "raw")
    same_content(top, base_theirs / "top.qcow2")
    assert own_allocation(top) == before == own_allocation(base_theirs / "top.qcow2")
    assert backing_of(top) == "mid.qcow2"
    assert_qemu_clean(top, base_ours / "mid.qcow2")


def test_offline_commit_below_image_repoints_the_overlay(tmp_path: Path) -> None:
    top = make_chain(tmp_path)
    expected = tmp_path / "expected.raw"
    qemu_img("convert", "-O", "raw", top, expected, check=True)
    proc = cli("commit", "--top", tmp_path / "mid.qcow2", top)
    assert proc.returncode == 0, proc.stderr
    assert backing_of(top) == "base.raw"
    same_content(top, expected, None, "raw")
    assert_qemu_clean(top, tmp_path / "mid.qcow2")


def test_offline_stream_and_rebase_match_qemu_img(tmp_path: Path) -> None:
    """A partial stream equals qemu-img rebase (safe) onto the same base; a full stream
    leaves no backing; imgchain rebase's own checks hold."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    top = make_chain(ours)
    clone(ours, theirs)
    proc = cli("stream", "--base", ours / "base.raw", "--output", "json", top)
    assert proc.returncode == 0, proc.stderr
    job_record_shape(json.loads(proc.stdout), "stream")
    qemu_img("rebase", "-b", "base.raw", "-F", "raw", theirs / "top.qcow2", check=True)
    same_content(top, theirs / "top.qcow2")
    assert backing_of(top) == "base.raw" == backing_of(theirs / "top.qcow2")
    assert_qemu_clean(top)

    expected = tmp_path / "expected.raw"
    qemu_img("convert", "-O", "raw", top, expected, check=True)
    proc = cli("stream", "-q", top)
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    assert backing_of(top) is None
    same_content(top, expected, None, "raw")
    assert_qemu_clean(top)

    # scenario 25's rebase half: safe rebase and the missing-argument error
    (tmp_path / "r").mkdir()
    top2 = make_chain(tmp_path / "r")
    qemu_img("convert", "-O", "raw", top2, expected, check=True)
    assert cli("rebase", "-b", "base.raw", "-F", "raw", top2).returncode == 0
    same_content(top2, expected, None, "raw")
    usage = cli("rebase", top2)
    assert usage.returncode == 2 and "Must specify backing file (-b) or use unsafe mode (-u)" in usage.stderr


def test_offline_errors_are_one_line(tmp_path: Path) -> None:
    top = make_chain(tmp_path)
    other = tmp_path / "other.raw"
    shutil.copy(tmp_path / "base.raw", other)
    one_error_line(cli("commit", "--base", other, top), f"'{other}' is not in the backing chain of '{top}'")
    one_error_line(cli("stream", "--bottom", other, top), "is not in the backing chain")
    one_error_line(cli("commit", tmp_path / "base.raw"), "Image does not have a backing file")
    one_error_line(cli("stream", tmp_path / "nothere.qcow2"), "nothere.qcow2")
    one_error_line(cli("stream", "--top", tmp_path / "mid.qcow2", "--base", tmp_path / "mid.qcow2", top),
                   "Node 'mid' is not a backing image of 'mid'")
    detach = cli("stream", "--detach", top)
    assert detach.returncode == 2 and "--detach needs a mounted chain" in detach.stderr
    # the same image held by a writer (qemu-io): locked out with a message
    holder = subprocess.Popen(["qemu-io", "-c", "sleep 30000", str(top)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_until_write_locked(top, holder)
        one_error_line(cli("stream", top), "lock")
    finally:
        holder.kill()
        holder.wait()
    assert_qemu_clean(top, tmp_path / "mid.qcow2")


def test_ctrl_c_cancels_an_offline_job_and_leaves_the_chain(tmp_path: Path) -> None:
    top = make_chain(tmp_path, 64)
    expected = tmp_path / "expected.raw"
    qemu_img("convert", "-O", "raw", top, expected, check=True)
    before = own_allocation(top)
    for command in ("stream", "commit"):
        proc = subprocess.Popen([IMGCHAIN, command, "--speed", "1M", str(top)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        wait_until_write_locked(top, proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, (out, err)
        assert "imgchain: error: top: Operation canceled" in err and "Traceback" not in err, err
        assert backing_of(top) == "mid.qcow2"
        same_content(top, expected, None, "raw")
        assert_qemu_clean(top, tmp_path / "mid.qcow2")
    assert own_allocation(top) != [] and before != []


def test_progress_line_on_a_terminal(tmp_path: Path) -> None:
    top = make_chain(tmp_path, 32)
    master, slave = pty.openpty()
    proc = subprocess.Popen([IMGCHAIN, "stream", "--speed", "16M", str(top)], stdout=subprocess.PIPE,
                            stderr=slave, text=True)
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0
    text = seen.decode()
    assert "stream top: [" in text and " / 32.0 MiB" in text and "%" in text and "/s" in text, text
    (tmp_path / "q").mkdir()
    quiet = cli("stream", "-q", make_chain(tmp_path / "q"))
    assert quiet.returncode == 0 and quiet.stdout == quiet.stderr == ""


# -- mounted -------------------------------------------------------------------------

class Writer(threading.Thread):
    """Writes random 4 KiB blocks through the mount with O_DIRECT, reads each back, and
    keeps a model of the guest content."""

    def __init__(self, disk: Path, size: int, span: int) -> None:
        super().__init__(daemon=True)
        self.disk, self.span = disk, span
        fd = os.open(disk, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, size)
            assert os.preadv(fd, [buf], 0) == size
            self.model = bytearray(buf)
        finally:
            os.close(fd)
        self.stop = threading.Event()
        self.writes = 0
        self.error: str | None = None

    def run(self) -> None:
        rng = random.Random(5)
        fd = os.open(self.disk, os.O_RDWR | os.O_DIRECT)
        out, back = mmap.mmap(-1, BLOCK), mmap.mmap(-1, BLOCK)
        try:
            while not self.stop.is_set():
                off = rng.randrange(0, self.span // BLOCK) * BLOCK
                data = rng.randbytes(BLOCK)
                out[:] = data
                assert os.pwritev(fd, [out], off) == BLOCK
                self.model[off:off + BLOCK] = data
                assert os.preadv(fd, [back], off) == BLOCK
                if back[:] != data:
                    self.error = f"read back differs at {off}"
                    return
                self.writes += 1
        except Exception as exc:  # reported by the test
            self.error = repr(exc)
        finally:
            os.close(fd)

    def finish(self) -> bytearray:
        self.stop.set()
        self.join(60)
        assert self.error is None, self.error
        assert self.writes > 0
        return self.model


def read_all(disk: Path, size: int) -> bytes:
    fd = os.open(disk, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, size)
        assert os.preadv(fd, [buf], 0) == size
        return bytes(buf)
    finally:
        os.close(fd)


def wait_connected(proc: subprocess.Popen[str], timeout: float = 60) -> None:
    """Wait until `proc` holds a socket (its connection to the daemon) after asking for its job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        fds = os.listdir(f"/proc/{proc.pid}/fd")
        links = []
        for fd in fds:
            try:
                links.append(os.readlink(f"/proc/{proc.pid}/fd/{fd}"))
            except OSError:
                pass
        if any(link.startswith("socket:") for link in links):
            time.sleep(0.5)  # not a timing assertion: the job is paused, so it cannot end meanwhile
            return
        time.sleep(0.02)
    raise AssertionError("the waiter never connected")


def jobs_json() -> list[dict]:
    proc = cli("jobs", "--output", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wait_for_job(job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job in jobs_json():
            if job["id"] == job_id:
                return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never appeared")


def test_mounted_stream_and_commit_with_a_writer(tmp_path: Path) -> None:
    """A stream and then an intermediate commit run in the mount's daemon while a writer
    keeps writing and verifying; the content equals the writer's model and every image
    passes qemu-img check."""
    size = 16 * MiB
    top = make_chain(tmp_path)
    disk = tmp_path / "disk.img"
    with mount(top, disk):
        writer = Writer(disk, size, size)
        writer.start()
        proc = cli("stream", "--base", tmp_path / "mid.qcow2", "--output", "json", top)
        assert proc.returncode == 0, proc.stderr
        job_record_shape(json.loads(proc.stdout), "stream")
        proc = cli("commit", "--output", "json", "--speed", "64M", tmp_path / "mid.qcow2")
        assert proc.returncode == 0, proc.stderr
        record = json.loads(proc.stdout)
        job_record_shape(record, "commit")
        assert record["id"] == "drive0" and "error" not in record
        model = writer.finish()
        assert read_all(disk, size) == model
    assert backing_of(top) == "base.raw"
    assert_qemu_clean(top, tmp_path / "mid.qcow2")
    with open(tmp_path / "model.raw", "wb") as f:
        f.write(model)
    same_content(top, tmp_path / "model.raw", None, "raw")


def test_detach_jobs_verbs_and_wait(tmp_path: Path) -> None:
    top = make_chain(tmp_path, 64)
    disk = tmp_path / "disk.img"
    with mount(top, disk):
        proc = cli("stream", "--detach", "--speed", "256K", "--job-id", "s1", "--output", "json", top)
        assert proc.returncode == 0, proc.stderr
        started = json.loads(proc.stdout)
        assert started["id"] == "s1" and started["mountpoint"] == str(disk)
        job = wait_for_job("s1")
        assert job["type"] == "stream" and job["speed"] == 256 * 1024 and job["mountpoint"] == str(disk)
        listed = cli("jobs")
        assert "s1: stream" in listed.stdout, listed.stdout
        mounts = json.loads(cli("mounts", "--output", "json").stdout)
        assert [j["id"] for j in mounts[0]["jobs"]] == ["s1"]
        assert "jobs: s1 (stream" in cli("mounts").stdout

        # a conflicting job is refused by the daemon, in one line
        one_error_line(cli("stream", "--base", tmp_path / "base.raw", top), "Node 'drive0' is busy: "
                       "block device is in use by block job: stream")
        one_error_line(cli("stream", tmp_path / "mid.qcow2"), "Node 'mid' is busy: block device is in use "
                       "by block job: stream")
        one_error_line(cli("commit", "--base", tmp_path / "nothere.raw", top), "nothere.raw")
        other = tmp_path / "other.raw"
        shutil.copy(tmp_path / "base.raw", other)
        one_error_line(cli("commit", "--base", other, top), f"'{other}' is not in the backing chain of '{top}'")

        assert cli("job", "pause", "s1").returncode == 0
        deadline = time.monotonic() + 60
        while wait_for_job("s1")["status"] != "paused":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        one_error_line(cli("job", "pause", "s1"), "Job is already paused")
        # the job cannot end while paused: the waiter finds it for sure
        waiter = subprocess.Popen([IMGCHAIN, "job", "wait", "--output", "json", "s1"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        wait_connected(waiter)
        assert cli("job", "resume", "s1").returncode == 0
        one_error_line(cli("job", "complete", "s1"),
                       "Job 's1' in state 'running' cannot accept command verb 'complete'")
        assert cli("job", "set-speed", "s1", "0").returncode == 0
        out, err = waiter.communicate(timeout=120)
        assert waiter.returncode == 0, err
        job_record_shape(json.loads(out), "stream")
        assert json.loads(cli("mounts", "--output", "json").stdout)[0]["jobs"] == []
        assert cli("jobs").stdout.strip() == "no jobs"
        one_error_line(cli("job", "wait", "s1"), "Block job 's1' not found")
        one_error_line(cli("job", "cancel", "nope"), "Block job 'nope' not found")
    assert backing_of(top) is None
    assert_qemu_clean(top)


def test_cancel_and_ctrl_c_of_mounted_jobs(tmp_path: Path) -> None:
    """`job cancel` ends a detached job (its waiter exits 1 with the error); Ctrl-C on an
    attached job cancels it in the daemon; the chain is as it was."""
    top = make_chain(tmp_path, 64)
    expected = tmp_path / "expected.raw"
    qemu_img("convert", "-O", "raw", top, expected, check=True)
    disk = tmp_path / "disk.img"
    with mount(top, disk):
        assert cli("stream", "--detach", "--speed", "256K", top).returncode == 0
        wait_for_job("drive0")
        waiter = subprocess.Popen([IMGCHAIN, "job", "wait", "drive0"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        wait_connected(waiter)
        assert cli("job", "cancel", "drive0").returncode == 0
        out, err = waiter.communicate(timeout=120)
        assert waiter.returncode == 1 and "imgchain: error: drive0: Operation canceled" in err, err

        proc = subprocess.Popen([IMGCHAIN, "commit", "--speed", "256K", str(tmp_path / "mid.qcow2")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_job("drive0")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, (out, err)
        assert "cancelling job 'drive0'" in err and "imgchain: error: drive0: Operation canceled" in err, err
        assert "Traceback" not in err
        assert jobs_json() == []
        assert read_all(disk, 64 * MiB) == expected.read_bytes()
    assert backing_of(top) == "mid.qcow2"
    same_content(top, expected, None, "raw")
    assert_qemu_clean(top, tmp_path / "mid.qcow2")


def test_mounted_active_commit_pivots_or_stays_ready(tmp_path: Path) -> None:
    """`commit IMAGE` on the mounted active image: the CLI completes the job at READY and the
    mount moves onto the base; with --no-pivot it returns at READY and `job complete` pivots."""
    top = make_chain(tmp_path)
    expected = tmp_path / "expected.raw"
    qemu_img("convert", "-O", "raw", top, expected, check=True)
    disk = tmp_path / "disk.img"
    with mount(top, disk):
        proc = cli("commit", "--no-pivot", "--output", "json", top)
        assert proc.returncode == 0, proc.stderr
        record = json.loads(proc.stdout)
        assert record["id"] == "drive0" and record["status"] in ("ready", "standby"), record
        assert wait_for_job("drive0")["status"] in ("ready", "standby")
        assert cli("job", "complete", "drive0").returncode == 0
        deadline = time.monotonic() + 60
        while jobs_json():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        nodes = json.loads(cli("mounts", "--output", "json").stdout)[0]
        assert read_all(disk, 16 * MiB) == expected.read_bytes()
        # the mount is on mid now: commit it into base, pivoting in the same command
        proc = cli("commit", tmp_path / "mid.qcow2")
        assert proc.returncode == 0, proc.stderr
        assert "completed" in proc.stdout
        assert read_all(disk, 16 * MiB) == expected.read_bytes()
        assert nodes["state"] == "running"
    same_content(tmp_path / "base.raw", expected, "raw", "raw")
    assert_qemu_clean(top, tmp_path / "mid.qcow2")


def test_jobs_and_snapshot_given_the_mount_point_work_on_the_mounted_chain(tmp_path: Path) -> None:
    """`imgchain snapshot|stream|commit MOUNTPOINT`: the mounted file stands for its mount's
    active image (not a raw image of its own with nothing to stream)."""
    top = make_chain(tmp_path)
    expected = tmp_path / "expected.raw"
    qemu_img("convert", "-O", "raw", top, expected, check=True)
    disk = tmp_path / "disk.img"
    with mount(top, disk):
        snap = tmp_path / "snap.qcow2"
        proc = cli("snapshot", disk, snap)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(qemu_img("info", "--output", "json", "-U", snap).stdout)["backing-filename"] == "top.qcow2"
        proc = cli("stream", "-q", disk)  # the active image is snap.qcow2 now: flatten it
        assert proc.returncode == 0, proc.stderr
        assert "backing-filename" not in json.loads(qemu_img("info", "--output", "json", "-U", snap).stdout)
        assert read_all(disk, 16 * MiB) == expected.read_bytes()
    assert_qemu_clean(snap)
    same_content(snap, expected, "qcow2", "raw")
