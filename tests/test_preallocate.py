"""Preallocation ahead of a growing qcow2 file (imgchain.preallocate, QEMU's preallocate filter).

While writes append clusters, the file is allocated and in the page cache ahead of its data; at
close it is cut back to the data, byte for byte the file the same writes make without it. A
kill leaves a tail of zeros that qemu-img checks as clean and that the next open keeps; a file
system without fallocate gets no preallocation and loses nothing; writes from several threads
move the data's end as far as the furthest. A mount preallocates by default (`--prealloc-size`,
shown in `imgchain mounts`), and not at all with `--prealloc-size 0`.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

import imgchain
from imgchain import preallocate
from imgchain.blockfile import BlockFile

from .conftest import REPO, qemu_img
from .mounting import cli, dd, mount, mounted_pid, wait_gone

MIB = 1 << 20
CLUSTER = 64 * 1024
SIZE = 64 * MIB


@pytest.fixture
def prealloc() -> Iterator[None]:
    """Preallocation of 1 MiB for what the test opens (a daemon's setting), off again after."""
    preallocate.set_prealloc_size(MIB)
    try:
        yield
    finally:
        preallocate.set_prealloc_size(0)


def overlay(tmp_path: Path, name: str) -> Path:
    """A fresh qcow2 overlay of a 64 MiB raw base of random bytes."""
    base = tmp_path / "base.raw"
    if not base.exists():
        base.write_bytes(random.Random(1).randbytes(SIZE))
    top = tmp_path / name
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "raw", top, str(SIZE), check=True)
    return top


def write_some(chain: imgchain.Chain, seed: int, count: int = 120) -> None:
    """Small writes into clusters the overlay does not hold (copies on write), whole clusters,
    and a flush in between: the file grows by appended clusters and tables."""
    rng = random.Random(seed)
    for i in range(count):
        offset = rng.randrange(SIZE // 4096) * 4096
        data = rng.randbytes(CLUSTER if i % 10 == 0 else 4096)
        chain.write(offset - offset % CLUSTER if len(data) == CLUSTER else offset, data)
        if i == count // 2:
            chain.flush()


def resident_bytes(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def test_a_growing_file_is_prepared_ahead_and_cut_back_to_the_same_bytes(tmp_path: Path, prealloc: None) -> None:
    with_it, without = overlay(tmp_path, "with.qcow2"), overlay(tmp_path, "without.qcow2")
    with imgchain.open_chain(with_it, writable=True) as chain:
        write_some(chain, seed=7)
        file = chain.active.driver.file
        assert file.preallocation is not None and file.preallocation.idle.wait(30)
        assert file.preallocation.failed is None
        st = os.fstat(file.fd)
        assert st.st_size >= file.data_end + MIB // 2  # prepared ahead of the data
        assert resident_bytes(with_it) >= st.st_size - MIB // 2  # and in the page cache
        end = file.data_end
    after = os.stat(with_it)
    assert after.st_size == end
    assert st.st_blocks - after.st_blocks >= (st.st_size - end) // 512  # the tail was allocated
    preallocate.set_prealloc_size(0)
    with imgchain.open_chain(without, writable=True) as chain:
        write_some(chain, seed=7)
        assert chain.active.driver.file.preallocation is None
    assert with_it.read_bytes() == without.read_bytes()
    assert "No errors were found" in qemu_img("check", with_it).stdout


KILLED = r"""
import os, sys, random
sys.path.insert(0, sys.argv[2])
import imgchain
from imgchain import preallocate
preallocate.set_prealloc_size(1 << 20)
chain = imgchain.open_chain(sys.argv[1], writable=True)
rng = random.Random(3)
for i in range(60):
    chain.write(rng.randrange(1024) * 65536 + 4096, bytes([i + 1]) * 4096)
chain.flush()
file = chain.active.driver.file
assert file.preallocation.idle.wait(30)
print(file.data_end, os.fstat(file.fd).st_size, flush=True)
os._exit(9)  # no close: like SIGKILL
"""


def test_a_kill_leaves_a_zero_tail_that_checks_clean_and_is_kept(tmp_path: Path) -> None:
    top = overlay(tmp_path, "top.qcow2")
    proc = subprocess.run([sys.executable, "-c", KILLED, str(top), str(REPO)], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    data_end, size = map(int, proc.stdout.split())
    assert os.path.getsize(top) == size > data_end  # the tail is there
    with open(top, "rb") as f:
        f.seek(data_end)
        assert f.read() == bytes(size - data_end)
    check = qemu_img("check", top)
    assert check.returncode in (0, 3) and "ERROR" not in check.stdout, check.stdout  # leaks at worst
    rng = random.Random(3)
    expected = {rng.randrange(1024) * 65536 + 4096: bytes([i + 1]) * 4096 for i in range(60)}
    with imgchain.open_chain(top, writable=True) as chain:
        for offset, data in expected.items():
            assert chain.read(offset, 4096) == data
        chain.write(SIZE - 4096, b"z" * 4096)
    assert os.path.getsize(top) >= size  # the next open keeps the tail: it cannot know it
    assert qemu_img("check", top).returncode in (0, 3)


def test_a_file_system_without_fallocate_gets_none_and_loses_nothing(tmp_path: Path, prealloc: None) -> None:
    disk, fs = tmp_path / "ext2.img", tmp_path / "fs"
    fs.mkdir()
    disk.write_bytes(b"")
    os.truncate(disk, 256 * MIB)
    subprocess.run(["mkfs.ext2", "-q", "-F", str(disk)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(disk), str(fs)], check=True, capture_output=True)
    try:
        on_ext2, elsewhere = overlay(tmp_path, "x.qcow2"), overlay(tmp_path, "y.qcow2")
        (fs / "top.qcow2").write_bytes(on_ext2.read_bytes())
        os.symlink(tmp_path / "base.raw", fs / "base.raw")
        with imgchain.open_chain(fs / "top.qcow2", writable=True) as chain:
            write_some(chain, seed=11)
            file = chain.active.driver.file
            assert file.preallocation is not None and file.preallocation.idle.wait(30)
            assert isinstance(file.preallocation.failed, OSError)  # EOPNOTSUPP: ext2 has no fallocate
        with imgchain.open_chain(elsewhere, writable=True) as chain:
            write_some(chain, seed=11)
        assert (fs / "top.qcow2").read_bytes() == elsewhere.read_bytes()
    finally:
        subprocess.run(["umount", str(fs)], check=True)


def test_writes_from_several_threads_move_the_data_end_to_the_furthest(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"h" * 4096)
    file = BlockFile(str(path), writable=True)
    file.preallocate(MIB)
    ends: list[int] = []

    def writer(n: int) -> None:
        rng = random.Random(n)
        for _ in range(200):
            at = rng.randrange(1, 4096) * 4096
            file.pwrite(at, bytes([n]) * 4096)
            ends.append(at + 4096)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert file.data_end == max(ends)
    file.close()
    assert os.path.getsize(path) == max(ends)


def test_a_mount_preallocates_unless_told_not_to(tmp_path: Path) -> None:
    sizes = {}
    for setting in ("16M", "0"):
        top = overlay(tmp_path, f"top-{setting}.qcow2")
        with mount(top, tmp_path / f"disk-{setting}", "--prealloc-size", setting) as mnt:
            record = next(r for r in json.loads(cli("mounts", "--output", "json").stdout)
                          if r["mountpoint"] == str(mnt.resolve()))
            assert record["prealloc-size"] == (16 * MIB if setting == "16M" else 0)
            dd("if=/dev/urandom", f"of={mnt}", "bs=4k", "count=512", "seek=100", "oflag=direct", "conv=notrunc")
            dd("if=/dev/urandom", f"of={mnt}", "bs=4k", "count=1", "seek=9000", "conv=fsync,notrunc")
            sizes[setting] = os.path.getsize(top)
        assert qemu_img("check", top).returncode == 0
        sizes[setting] -= os.path.getsize(top)  # what the unmount cut
    assert sizes["16M"] >= 8 * MIB and sizes["0"] == 0


def test_a_kill_9_of_a_mount_with_a_tail_loses_nothing(tmp_path: Path) -> None:
    top = overlay(tmp_path, "top.qcow2")
    data = random.Random(5).randbytes(2 * MIB)
    with mount(top, tmp_path / "disk") as mnt:
        with open(mnt, "r+b") as f:
            f.seek(3 * MIB)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        deadline = time.monotonic() + 30
        while os.path.getsize(top) < 16 * MIB and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.getsize(top) >= 16 * MIB  # the data, and 16 MiB ahead
        pid = mounted_pid(mnt)
        os.kill(pid, 9)
        wait_gone(pid)
    assert qemu_img("check", top).returncode in (0, 3)
    with imgchain.open_chain(top) as chain:
        assert chain.read(3 * MIB, len(data)) == data


def test_a_bad_prealloc_size_is_one_line(tmp_path: Path) -> None:
    top = overlay(tmp_path, "top.qcow2")
    proc = cli("mount", "--prealloc-size", "3K", top, tmp_path / "disk")
    assert proc.returncode == 2
    assert "--prealloc-size" in proc.stderr and "multiple of 1M" in proc.stderr
    assert "Traceback" not in proc.stderr
