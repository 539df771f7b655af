"""`imgchain snapshot IMAGE NEW`: live external snapshots of a mounted chain (QMP
blockdev-snapshot-sync in the mount's daemon) under a verifying writer, then an active
commit of the snapshot back with `imgchain commit`; backing names relative to NEW's folder
or absolute; the offline form (= `imgchain create -b IMAGE NEW`); one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import assert_qemu_clean, qemu_img, qemu_io
from tests.mounting import cli, mount
from tests.test_cli_jobs import Writer, jobs_json, make_chain, read_all, wait_for_job

MiB = 1 << 20
SIZE = 16 * MiB


def info(image: Path) -> dict:
    return json.loads(qemu_img("info", "--output=json", "-U", image, check=True).stdout)


def allocated(image: Path, offset: int, length: int) -> int:
    """Bytes of [offset, offset+length) the image itself allocates (qemu-io alloc, read-only, shared)."""
    proc = qemu_io(image, f"alloc {offset} {length}", extra=("-r", "-U"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return int(proc.stdout.split("/")[0])


def mount_doc(disk: Path) -> dict:
    proc = cli("mounts", "--output", "json")
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in json.loads(proc.stdout) if d["mountpoint"] == str(disk)]
    assert len(docs) == 1, proc.stdout
    return docs[0]


def one_error_line(proc: subprocess.CompletedProcess[str], text: str, code: int = 1) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imgchain: error: ") and text in lines[0], proc.stderr
    assert proc.stdout == ""


def wait_writes(writer: Writer, more: int, timeout: float = 60) -> None:
    """Wait until the writer has done `more` verified writes beyond now (progress, not timing)."""
    target = writer.writes + more
    deadline = time.monotonic() + timeout
    while writer.writes < target:
        assert writer.error is None, writer.error
        assert writer.is_alive(), "the writer stopped"
        assert time.monotonic() < deadline, "the writer made no progress"
        time.sleep(0.01)


def write_pattern(disk: Path, offset: int, data: bytes) -> None:
    fd = os.open(disk, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_live_snapshot_under_a_writer_then_active_commit_back(tmp_path: Path) -> None:
    """A snapshot of the mounted chain while a writer writes and verifies through the mount:
    no request fails, the mount moves onto NEW (mounts), later writes land in NEW (its own
    allocation) and not in the old active image, which is read-only now (qemu-io cannot
    write it while mounted). Then `imgchain commit NEW` (active commit, pivot) under the
    same writer: the mount is back on the old image, NEW is out of the chain, the content
    is the writer's model and every image passes qemu-img check."""
    top = make_chain(tmp_path)
    new = tmp_path / "snap.qcow2"
    disk = tmp_path / "disk.img"
    with mount(top, disk):
        writer = Writer(disk, SIZE, 8 * MiB)  # writes below 8 MiB; the pattern below goes at 10 MiB
        writer.start()
        try:
            wait_writes(writer, 50)
            proc = cli("snapshot", top, new)
            assert proc.returncode == 0, proc.stderr
            assert "now on" in proc.stdout and proc.stderr == ""
            wait_writes(writer, 50)  # the writer goes on over the new overlay
            assert writer.error is None

            doc = mount_doc(disk)
            assert doc["image"] == str(new)
            assert [n["node-name"] for n in doc["nodes"]] == ["snap", "top", "mid", "base"]
            meta = info(new)
            assert meta["backing-filename"] == "top.qcow2" and meta["backing-filename-format"] == "qcow2"
            assert meta["virtual-size"] == SIZE

            # later writes land in NEW, not in the old active image
            assert allocated(top, 10 * MiB, MiB) == 0
            write_pattern(disk, 10 * MiB, b"\x5a" * MiB)
            assert allocated(new, 10 * MiB, MiB) == MiB
            assert allocated(top, 10 * MiB, MiB) == 0
            assert allocated(new, 0, 8 * MiB) > 0  # the writer's too
            # the old active image is a read-only backing now: QEMU may not write it
            refused = qemu_io(top, "write 0 4k")
            assert refused.returncode != 0 and 'Failed to get "write" lock' in refused.stderr, refused.stderr

            # active commit of the snapshot back into the old active image, pivoting
            proc = cli("commit", "--output", "json", new)
            assert proc.returncode == 0, proc.stderr
            record = json.loads(proc.stdout)
            assert record["type"] == "commit" and record["status"] == "concluded" and "error" not in record
            assert jobs_json() == []
            doc = mount_doc(disk)
            assert doc["image"] == str(top)
            assert [n["node-name"] for n in doc["nodes"]] == ["top", "mid", "base"]
            assert "  nodes: top=" in cli("mounts").stdout
            wait_writes(writer, 50)  # writes after the pivot go to top.qcow2
        finally:
            model = writer.finish()
        model[10 * MiB:11 * MiB] = b"\x5a" * MiB
        assert read_all(disk, SIZE) == model
        assert allocated(top, 10 * MiB, MiB) == MiB
    assert_qemu_clean(new, top, tmp_path / "mid.qcow2")
    (tmp_path / "model.raw").write_bytes(model)
    proc = qemu_img("compare", "-F", "raw", top, tmp_path / "model.raw")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the overlay still names top.qcow2 and holds what was written while it was active
    assert info(new)["backing-filename"] == "top.qcow2"


def test_relative_and_absolute_backing_names(tmp_path: Path) -> None:
    """By default NEW names the active image relative to NEW's folder (`../top.qcow2` from a
    subfolder), with --absolute by its absolute path; --node-name names the new node; QEMU
    opens the resulting chain with the mounted content."""
    top = make_chain(tmp_path)
    expected = read_all_chain(top, tmp_path)
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    rel, absolute = snaps / "s1.qcow2", tmp_path / "s2.qcow2"
    disk = tmp_path / "disk.img"
    with mount(top, disk):
        proc = cli("snapshot", "--output", "json", top, rel)
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["backing-filename"] == "../top.qcow2" and doc["node-name"] == "s1" and doc["mounted"]
        proc = cli("snapshot", "--absolute", "--node-name", "second", "--output", "json", rel, absolute)
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["backing-filename"] == str(rel) and doc["node-name"] == "second"
        assert [n["node-name"] for n in mount_doc(disk)["nodes"]] == ["second", "s1", "top", "mid", "base"]
        assert read_all(disk, SIZE) == expected
    assert info(rel)["backing-filename"] == "../top.qcow2"
    assert info(absolute)["backing-filename"] == str(rel)
    chain = json.loads(qemu_img("info", "--output=json", "--backing-chain", absolute, check=True).stdout)
    assert [os.path.basename(i["filename"]) for i in chain] == ["s2.qcow2", "s1.qcow2", "top.qcow2",
                                                                "mid.qcow2", "base.raw"]
    assert_qemu_clean(absolute, rel, top)
    (tmp_path / "expected.raw").write_bytes(expected)
    proc = qemu_img("compare", "-F", "raw", absolute, tmp_path / "expected.raw")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def read_all_chain(top: Path, tmp_path: Path) -> bytes:
    out = tmp_path / "content.raw"
    qemu_img("convert", "-O", "raw", top, out, check=True)
    data = out.read_bytes()
    out.unlink()
    return data


def test_offline_snapshot_is_create_b(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not mounted: `snapshot IMAGE NEW` makes what `imgchain create -b IMAGE NEW` makes
    (same header fields, empty, same content); in a subfolder the name is relative to it."""
    top = make_chain(tmp_path)
    monkeypatch.chdir(tmp_path)
    proc = cli("snapshot", "top.qcow2", "new.qcow2")
    assert proc.returncode == 0, proc.stderr
    assert "not mounted" in proc.stdout
    ref = cli("create", "-q", "-b", "top.qcow2", "ref.qcow2")
    assert ref.returncode == 0, ref.stderr
    ours, theirs = info(tmp_path / "new.qcow2"), info(tmp_path / "ref.qcow2")
    for key in ("format", "virtual-size", "cluster-size", "backing-filename", "backing-filename-format"):
        assert ours[key] == theirs[key], key
    assert ours["backing-filename"] == "top.qcow2"
    assert allocated(tmp_path / "new.qcow2", 0, SIZE) == 0
    proc = qemu_img("compare", "new.qcow2", top)
    assert proc.returncode == 0, proc.stdout
    (tmp_path / "sub").mkdir()
    proc = cli("snapshot", "--output", "json", "top.qcow2", "sub/new.qcow2")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["backing-filename"] == "../top.qcow2" and doc["mounted"] is False
    assert info(tmp_path / "sub" / "new.qcow2")["backing-filename"] == "../top.qcow2"
    assert cli("snapshot", "--absolute", "top.qcow2", "abs.qcow2").returncode == 0
    assert info(tmp_path / "abs.qcow2")["backing-filename"] == str(top)
    assert_qemu_clean(tmp_path / "new.qcow2", tmp_path / "sub" / "new.qcow2", tmp_path / "abs.qcow2")


def test_snapshot_errors_are_one_line(tmp_path: Path) -> None:
    """Missing IMAGE, NEW existing (left untouched), a missing folder, a backing image of a
    mounted chain, a device held by a job (NEW not left behind), a taken node name, a
    read-only mount: one line each, exit 1; --node-name without a mount is a usage error."""
    top = make_chain(tmp_path, 64)
    mid = tmp_path / "mid.qcow2"
    new = tmp_path / "new.qcow2"
    one_error_line(cli("snapshot", tmp_path / "nothere.qcow2", new), "nothere.qcow2")
    one_error_line(cli("snapshot", top, mid), f"Could not create '{mid}': File exists")
    one_error_line(cli("snapshot", top, tmp_path / "nodir" / "x.qcow2"), "No such file or directory")
    usage = cli("snapshot", "--node-name", "n", top, new)
    assert usage.returncode == 2 and "--node-name needs a mounted chain" in usage.stderr
    assert "Traceback" not in usage.stderr and not new.exists()
    before = info(mid)
    disk = tmp_path / "disk.img"
    with mount(top, disk):
        one_error_line(cli("snapshot", top, mid), f"Could not create '{mid}': File exists")
        assert info(mid) == before
        one_error_line(cli("snapshot", mid, new), f"{mid} is a backing image of the chain mounted on {disk}")
        one_error_line(cli("snapshot", "--node-name", "base", top, new), "Duplicate nodes with node-name='base'")
        assert not new.exists()
        assert cli("stream", "--detach", "--speed", "256K", top).returncode == 0
        wait_for_job("drive0")
        for absolute in ((), ("--absolute",)):
            one_error_line(cli("snapshot", *absolute, top, new),
                           "Node 'drive0' is busy: block device is in use by block job: stream")
            assert not new.exists()
        assert cli("job", "cancel", "drive0").returncode == 0
        deadline = time.monotonic() + 60
        while jobs_json():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert mount_doc(disk)["image"] == str(top)
    with mount(top, disk, "--read-only"):
        one_error_line(cli("snapshot", top, new), "mounted read-only")
        assert not new.exists()
    assert_qemu_clean(top, mid)
