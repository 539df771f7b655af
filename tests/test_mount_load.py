"""Mounts under real load: fio with verification, ext4 on a loop device, kill -9 mid-write."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

import imgchain
from imgchain.create import create_image

from .conftest import qemu_img
from .mounting import cli, is_mountpoint, mount, mounted_pid, wait_gone

MiB = 1 << 20


def three_layers(tmp: Path, size: int) -> Path:
    """base.raw (patterned) <- mid.qcow2 (64 KiB clusters, some data) <- top.qcow2 (4 KiB clusters)."""
    base = tmp / "base.raw"
    with open(base, "wb") as f:
        f.write(bytes(range(256)) * (size // 256))
    create_image(str(tmp / "mid.qcow2"), "qcow2", size, "base.raw", "raw")
    with imgchain.open_chain(tmp / "mid.qcow2", writable=True) as chain:
        for off in range(0, size, size // 8):
            chain.write(off + 1000, b"\x33" * 50_000)
    create_image(str(tmp / "top.qcow2"), "qcow2", size, "mid.qcow2", "qcow2", 4096)
    return tmp / "top.qcow2"


def check_rc(image: Path) -> int:
    return qemu_img("check", image).returncode


def test_fio_verify_on_three_layers(tmp_path: Path) -> None:
    top = three_layers(tmp_path, 32 * MiB)
    disk = tmp_path / "disk.img"
    with mount(top, disk):
        for bs, rw in (("4k", "randwrite"), ("64k", "randrw")):
            proc = subprocess.run(
                ["fio", "--name=verify", f"--filename={disk}", "--direct=1", "--ioengine=libaio",
                 "--iodepth=16", f"--rw={rw}", f"--bs={bs}", "--size=8M", "--numjobs=4",
                 "--offset_increment=8M", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
                 "--group_reporting", "--randrepeat=0"],
                capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert "verify" in proc.stdout and "err= 0" in proc.stdout
    for image in (top, tmp_path / "mid.qcow2"):
        assert check_rc(image) == 0


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 0, f"{argv}: {proc.stdout}{proc.stderr}"


def test_ext4_on_a_loop_device_survives_remount(tmp_path: Path) -> None:
    top = three_layers(tmp_path, 64 * MiB)
    disk, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    mnt.mkdir()
    files = {f"f{i}.bin": random.Random(i).randbytes(random.Random(i).randrange(1, 3 * MiB)) for i in range(6)}
    with mount(top, disk):
        _run("mkfs.ext4", "-q", "-F", str(disk))
        _run("mount", "-o", "loop", str(disk), str(mnt))
        try:
            for name, data in files.items():
                (mnt / name).write_bytes(data)
            _run("sync")
        finally:
            _run("umount", str(mnt))
        _run("e2fsck", "-fn", str(disk))
    assert check_rc(top) == 0
    with mount(top, disk):
        _run("e2fsck", "-fn", str(disk))
        _run("mount", "-o", "loop,ro", str(disk), str(mnt))
        try:
            for name, data in files.items():
                assert hashlib.sha256((mnt / name).read_bytes()).digest() == hashlib.sha256(data).digest()
        finally:
            _run("umount", str(mnt))


WRITER = r"""
import os, sys
disk, journal, start, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
fd = os.open(disk, os.O_RDWR)
with open(journal, "a", buffering=1) as log:
    for i in range(count):
        block = bytes([(i % 250) + 1]) * 4096
        os.pwrite(fd, block, start + (i % 512) * 4096)
        os.fsync(fd)
        log.write(f"{i}\n")  # written only after fsync returned
"""


def test_kill_9_during_writes_loses_nothing_fsynced(tmp_path: Path) -> None:
    top = three_layers(tmp_path, 32 * MiB)
    disk = tmp_path / "disk.img"
    journal = tmp_path / "journal"
    with mount(top, disk):
        pid = mounted_pid(disk)
        fio = subprocess.Popen(
            ["fio", "--name=load", f"--filename={disk}", "--direct=1", "--ioengine=libaio",
             "--iodepth=16", "--rw=randwrite", "--bs=4k", "--size=8M", "--numjobs=2",
             "--offset_increment=8M", "--time_based", "--runtime=30"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        writer = subprocess.Popen(["python3", "-c", WRITER, str(disk), str(journal), str(20 * MiB), "100000"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while (not journal.exists() or len(journal.read_text().split()) < 200) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        for proc in (fio, writer):
            proc.kill()
            proc.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(disk)], capture_output=True)
    assert not is_mountpoint(disk)
    done = [int(x) for x in journal.read_text().split()]
    assert len(done) >= 200
    for image in (top, tmp_path / "mid.qcow2"):
        assert check_rc(image) in (0, 3), qemu_img("check", image).stdout
    expected: dict[int, int] = {}
    for i in done:
        expected[i % 512] = (i % 250) + 1
    with imgchain.open_chain(top) as chain:
        for slot, value in expected.items():
            assert chain.read(20 * MiB + slot * 4096, 4096) == bytes([value]) * 4096, slot
    assert cli("mounts", "--output", "json").stdout.strip() == "[]"  # the stale record is gone
    assert qemu_img("check", "-r", "leaks", top).returncode == 0
    with mount(top, disk):  # and it mounts again
        assert disk.stat().st_size == 32 * MiB
