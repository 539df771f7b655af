"""The mount daemon's memory is bounded: whatever the virtual size, depth and workload, it stays
under 64 MiB of resident memory, and `--cache-size` bounds its metadata caches.

Real mounts, real fio (4 KiB random reads and writes, libaio, queue depth 16), and the daemon's
peak resident set read from /proc/PID/status (VmHWM). A memory bound is not a timing: the
figures do not depend on the machine's speed, only on what the daemon keeps. With a 1 MiB cache
(a dozen tables, written back every few), fio's crc32c verification and qemu-img check show
that the data and the images stay right. In process, the table pool and the cluster maps stay
within their budget on a chain whose tables would take 128 MiB.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import trio

from imgchain import metacache
from imgchain.backend import GROUP_BYTES, BlockBackend
from imgchain.chain import close_chain, open_backing_chain, open_image
from imgchain.create import create_image

from .conftest import assert_qemu_clean, qemu_img, qemu_io
from .mounting import cli, mount

MIB, GIB = 1 << 20, 1 << 30
RSS_LIMIT = 64 * MIB
L2_SPAN = 512 * MIB  # guest bytes one 64 KiB L2 table maps


def vm_status(pid: int, field: str) -> int:
    """A VmXXX field of /proc/PID/status, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def fio(target: Path, *options: str) -> dict:
    proc = subprocess.run(["fio", "--name=mem", f"--filename={target}", "--bs=4k", "--ioengine=libaio",
                           "--iodepth=16", "--direct=1", "--randrepeat=1", "--output-format=json", *options],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0, job
    return job


def huge_chain(directory: Path, size: str = "1T") -> Path:
    """base.qcow2 <- top.qcow2 of `size`, the base with a cluster written every 64 GiB."""
    base, top = directory / "base.qcow2", directory / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, size, check=True)
    writes = [f"write -P 0x5a {off} 64k" for off in range(0, 1 << 40, 64 * GIB)]
    assert qemu_io(base, *writes, fmt="qcow2").returncode == 0
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, check=True)
    return top


def deep_chain(directory: Path, layers: int = 64, spans: int = 32) -> Path:
    """`layers` qcow2 images of spans * 512 MiB, each with one 4 KiB write in every L2 table's
    range: unbounded, their L2 tables alone would take layers * spans * 64 KiB (128 MiB).
    Each layer is written alone (its clusters hold nothing below), in this process."""
    size = spans * L2_SPAN
    below = None
    for i in range(layers):
        image = directory / f"l{i}.qcow2"
        create_image(str(image), "qcow2", size, below.name if below else None, "qcow2" if below else None)
        node = open_image(str(image), writable=True)
        try:
            for s in range(spans):
                node.write(s * L2_SPAN + i * 65536, bytes([i + 1]) * 4096)
        finally:
            node.close()
        below = image
    assert below is not None
    return below


def peak_under_random_io(top: Path, mnt: Path, *mount_options: str, seconds: int = 5) -> int:
    """The daemon's VmHWM after `seconds` of random 4 KiB reads and writes over the whole file."""
    return measured_mount(top, mnt, *mount_options, seconds=seconds)[0]


def measured_mount(top: Path, mnt: Path, *mount_options: str, seconds: int) -> tuple[int, dict]:
    """peak_under_random_io, and the mount's entry in `imgchain mounts --output json`."""
    with mount(top, mnt, *mount_options):
        record = next(r for r in json.loads(cli("mounts", "--output", "json").stdout)
                      if r["mountpoint"] == str(mnt.resolve()))
        job = fio(mnt, "--rw=randrw", "--time_based", f"--runtime={seconds}")
        assert job["read"]["total_ios"] + job["write"]["total_ios"] > 1000  # it did work
        return vm_status(record["pid"], "VmHWM"), record


def test_daemon_stays_under_64_mib_on_a_1tib_chain(tmp_path: Path) -> None:
    peak = peak_under_random_io(huge_chain(tmp_path), tmp_path / "disk")
    assert peak < RSS_LIMIT, f"peak RSS {peak / MIB:.1f} MiB"


def test_daemon_stays_under_64_mib_on_a_64_layer_chain(tmp_path: Path) -> None:
    peak = peak_under_random_io(deep_chain(tmp_path), tmp_path / "disk")
    assert peak < RSS_LIMIT, f"peak RSS {peak / MIB:.1f} MiB"


def test_a_small_cache_size_is_honoured(tmp_path: Path) -> None:
    """The same workload with --cache-size 1M peaks well below the default's 16 MiB of caches,
    and the bound is in the mount's record."""
    top = huge_chain(tmp_path)
    mnt = tmp_path / "disk"
    small, record = measured_mount(top, mnt, "--cache-size", "1M", seconds=3)
    assert record["cache-size"] == MIB
    default, record = measured_mount(top, mnt, seconds=3)
    assert record["cache-size"] == 16 * MIB
    assert small < default - 8 * MIB, f"--cache-size 1M: {small / MIB:.1f} MiB, default: {default / MIB:.1f} MiB"


def test_data_stays_right_with_a_tiny_cache(tmp_path: Path) -> None:
    """fio writes 4 KiB blocks at random over a 32-layer chain and reads every one back
    (crc32c), through a 1 MiB cache that holds a dozen tables; clusters it left alone still
    show the layer that wrote them last; then qemu-img check."""
    top = deep_chain(tmp_path, layers=32, spans=8)
    with mount(top, tmp_path / "disk", "--cache-size", "1M") as mnt:
        job = fio(mnt, "--rw=randwrite", f"--size={6 * L2_SPAN}", "--io_size=2M", "--verify=crc32c",
                  "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0")
        assert job["write"]["total_ios"] == 512
        assert job["read"]["total_ios"] >= 512  # the verification pass read them all back
        with open(mnt, "rb", buffering=0) as f:
            for span in (6, 7):
                for layer in range(32):
                    off = span * L2_SPAN + layer * 65536
                    assert os.pread(f.fileno(), 4096, off) == bytes([layer + 1]) * 4096, (span, layer)
    assert_qemu_clean(top)


async def test_tables_and_maps_stay_within_the_budget(tmp_path: Path) -> None:
    """In process: 4 KiB reads at random over the 64-layer chain with a 2 MiB budget; the pool
    and the maps never pass their share, and every read equals the slow path's."""
    top_path = deep_chain(tmp_path, layers=64, spans=32)
    saved = metacache.cache_size()
    metacache.set_cache_size(2 * MIB)
    top = open_backing_chain(str(top_path), writable=False)
    try:
        backend = BlockBackend(top)
        rng = random.Random(1)
        most = 0
        for _ in range(1500):
            off = rng.randrange(backend.size // 4096) * 4096
            got = backend.read_now(off, 4096) or await backend.read(off, 4096)
            if rng.random() < 0.05:
                assert got == top.read(off, 4096), off
            most = max(most, metacache.POOL.used)
        assert most <= metacache.POOL.capacity == 2 * MIB - metacache.map_budget()
        assert len(backend._groups) * GROUP_BYTES <= metacache.map_budget()
        assert len(backend._groups) > 16  # the maps were used up to their bound
    finally:
        close_chain(top)
        metacache.set_cache_size(saved)
    await trio.lowlevel.checkpoint()
