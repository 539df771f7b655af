"""Real FUSE mounts: the chain as a block file, read and written with dd, fsync, O_DIRECT."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

import imgchain

from .conftest import assert_qemu_clean, qemu_io
from .mounting import IMGCHAIN, cli, dd, is_mountpoint, mount, mounted_pid, require_fuse, wait_gone

MiB = 1 << 20


def model_of(chain3: Path) -> bytearray:
    with imgchain.open_chain(chain3) as chain:
        return bytearray(chain.read(0, chain.size))


def test_mount_shows_the_chain(chain3: Path) -> None:
    model = model_of(chain3)
    disk = chain3.parent / "disk.img"
    with mount(chain3, disk):
        assert disk.stat().st_size == len(model)
        assert disk.read_bytes() == model
        records = json.loads(cli("mounts", "--output", "json").stdout)
        mine = [r for r in records if r["mountpoint"] == str(disk.resolve())]
        assert len(mine) == 1
        assert [n["node-name"] for n in mine[0]["nodes"]] == ["top", "mid", "base"]
        assert mine[0]["image"] == str(chain3.resolve())
    assert not is_mountpoint(disk)
    assert not disk.exists()  # created by the mount, removed by the unmount


def test_dd_unaligned_patterns_cross_clusters_and_layers(chain3: Path) -> None:
    """top has 4 KiB clusters, mid 64 KiB, base raw: writes cross all of them."""
    model = model_of(chain3)
    rng = random.Random(7)
    disk = chain3.parent / "disk.img"
    writes = [(rng.randrange(0, 4 * MiB - 300_000), rng.randrange(1, 300_000)) for _ in range(12)]
    writes += [(MiB - 100, 200), (65536 - 1, 2), (4 * MiB - 513, 513)]
    with mount(chain3, disk):
        for i, (off, n) in enumerate(writes):
            data = bytes([i + 1]) * n
            src = chain3.parent / f"pat{i}"
            src.write_bytes(data)
            dd(f"if={src}", f"of={disk}", "bs=1", f"seek={off}", "conv=notrunc,fsync") if n < 600 else \
                dd(f"if={src}", f"of={disk}", "iflag=count_bytes", f"seek={off}", "oflag=seek_bytes",
                   "conv=notrunc,fsync", "bs=64k")
            model[off:off + n] = data
        assert disk.read_bytes() == model
        for off, n in writes[:5]:  # unaligned reads through the mount
            got = dd(f"if={disk}", "iflag=skip_bytes,count_bytes", f"skip={off}", f"count={n}", "bs=7777")
            assert got.returncode == 0
    for i, (off, n) in enumerate(writes):  # and through qemu-io after the unmount
        expected = model[off:off + n]
        proc = qemu_io(chain3, f"read -P {expected[0]} {off} {n}") if len(set(expected)) == 1 else None
        if proc is not None:
            assert proc.returncode == 0 and "Pattern verification failed" not in proc.stdout
    with imgchain.open_chain(chain3) as chain:
        assert chain.read(0, chain.size) == model
    assert_qemu_clean(chain3, chain3.parent / "mid.qcow2")


def test_o_direct_and_fsync_durability(chain3: Path) -> None:
    disk = chain3.parent / "disk.img"
    with mount(chain3, disk):
        fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
        try:
            import mmap
            buf = mmap.mmap(-1, 8192)
            buf.write(b"\x5a" * 8192)
            assert os.pwrite(fd, buf, 12288) == 8192
            os.fsync(fd)
            back = mmap.mmap(-1, 8192)
            assert os.preadv(fd, [back], 12288) == 8192 and back[:] == b"\x5a" * 8192
        finally:
            os.close(fd)
        fd = os.open(disk, os.O_RDWR)
        try:
            os.pwrite(fd, b"durable", 3 * MiB + 5)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        # fsync'd data is in the image files while still mounted (read them with -U)
        with imgchain.open_chain(chain3, force_share=True) as chain:
            assert chain.read(3 * MiB + 5, 7) == b"durable"
            assert chain.read(12288, 8192) == b"\x5a" * 8192


def test_size_is_fixed_and_writes_past_end_fail(chain3: Path) -> None:
    disk = chain3.parent / "disk.img"
    with mount(chain3, disk):
        with pytest.raises(OSError) as info:
            os.truncate(disk, 1 * MiB)
        assert info.value.errno == errno.EPERM
        fd = os.open(disk, os.O_WRONLY)
        try:
            assert os.pwrite(fd, b"abcd", 4 * MiB - 2) == 2  # short write at the end
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"x", 4 * MiB)
            assert info.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        assert os.stat(disk).st_size == 4 * MiB


def test_read_only_mount_refuses_writes(chain3: Path) -> None:
    disk = chain3.parent / "disk.img"
    before = chain3.read_bytes()
    with mount(chain3, disk, "--read-only"):
        assert disk.read_bytes()[:4] == b"\xaa" * 4
        with pytest.raises(OSError) as info:
            os.open(disk, os.O_WRONLY)
        assert info.value.errno == errno.EROFS
        assert qemu_io(chain3, "read 0 512", extra=("-r", "-U")).returncode == 0
    assert chain3.read_bytes() == before


def test_existing_regular_file_is_mounted_over_and_kept(chain3: Path) -> None:
    disk = chain3.parent / "disk.img"
    disk.write_bytes(b"underneath")
    with mount(chain3, disk):
        assert disk.stat().st_size == 4 * MiB
    assert disk.read_bytes() == b"underneath"


@pytest.mark.parametrize("args, text", [
    (("mount", "nothere.qcow2", "disk.img"), "nothere.qcow2"),
    (("mount", "top.qcow2", "."), "must be a regular file"),
    (("unmount", "top.qcow2"), "is not an imgchain mount"),
])
def test_mount_errors_are_one_line(chain3: Path, args: tuple[str, ...], text: str) -> None:
    proc = subprocess.run([IMGCHAIN, *args], capture_output=True, text=True, cwd=chain3.parent)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("imgchain: error: ") and text in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_mounting_a_mounted_chain_fails_on_its_lock(chain3: Path) -> None:
    with mount(chain3, chain3.parent / "disk.img"):
        proc = cli("mount", chain3, chain3.parent / "disk2.img")
        assert proc.returncode == 1 and "in use by another process" in proc.stderr
        assert not (chain3.parent / "disk2.img").exists()


@pytest.mark.parametrize("how", ["unmount", "umount", "fusermount3", "SIGTERM", "SIGINT", "quit"])
def test_every_way_of_stopping_is_clean(chain3: Path, how: str) -> None:
    require_fuse()
    disk = chain3.parent / "disk.img"
    proc = subprocess.Popen([IMGCHAIN, "mount", "--foreground", str(chain3), str(disk)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "mounted" in line, proc.stderr.read() if proc.poll() is not None else line
    fd = os.open(disk, os.O_WRONLY)
    os.pwrite(fd, b"\x42" * 5000, 777)  # not fsync'd: the clean stop must flush it
    os.close(fd)
    if how in ("umount", "fusermount3"):
        argv = ["umount", str(disk)] if how == "umount" else ["fusermount3", "-u", str(disk)]
        subprocess.run(argv, check=True)
    elif how.startswith("SIG"):
        proc.send_signal(getattr(signal, how))
    elif how == "quit":
        from imgchain.qmp_client import QmpClient
        socket = line.rsplit("QMP socket ", 1)[1].rstrip(")\n")
        with QmpClient(socket) as client:
            assert client.execute("quit") == {}
    else:
        assert cli("unmount", disk).returncode == 0
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert not is_mountpoint(disk)
    assert json.loads(cli("mounts", "--output", "json").stdout) == []
    assert qemu_io(chain3, "read -P 0x42 777 5000").returncode == 0  # locks released, data there
    assert_qemu_clean(chain3)


def test_stale_records_are_ignored_and_cleaned(chain3: Path) -> None:
    from imgchain.runtime import MountRecord, live_records, record_path, write_record
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_record(MountRecord(pid=dead.pid, mountpoint="/nowhere", image="/x", socket="/nowhere.sock"))
    assert os.path.exists(record_path(dead.pid))
    assert all(r.pid != dead.pid for r in live_records())
    assert not os.path.exists(record_path(dead.pid))


def test_background_daemon_unmounts_cleanly(chain3: Path) -> None:
    disk = chain3.parent / "disk.img"
    with mount(chain3, disk):
        pid = mounted_pid(disk)
    wait_gone(pid)
    assert qemu_io(chain3, "write 0 512").returncode == 0  # locks are gone
