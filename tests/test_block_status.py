"""Qcow2Driver.block_status against a per-cluster reference written here.

The driver walks each L2 slice once and makes an Extent only where a run
breaks; the reference below looks at one cluster at a time, straight from
the file's bytes, and merges as `block_status` documents it (same status,
not compressed, host offsets continuing or both absent). Images: made by
qemu-io (data, zero with and without a kept cluster, compressed, discarded),
made by imgchain (writes, zero clusters), and preallocated images whose L2
tables are then overwritten with random entries (flag noise, COPIED toggles,
compressed descriptors, hosts at the top of the offset space, unaligned
hosts, a missing L2 table). Ranges start and end anywhere, mid-cluster
included. Errors must match too.
"""

from __future__ import annotations

import os
import random
import subprocess
from array import array
from collections.abc import Callable
from pathlib import Path

import pytest

import imgchain
from imgchain.create import create_image
from imgchain.extent import Extent, Status
from imgchain.formats import CorruptImage
from imgchain.formats.qcow2_tables import (
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO,
    ClusterType, classify_l2, compressed_extent, decode_u64_table, encode_u64_table)
from imgchain.qcow2 import Qcow2Driver

from .conftest import qemu_img, qemu_io

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CLUSTER_SIZES = [512, 64 * KiB]
# Guest sizes that give several L2 tables: 32 KiB per table at 512 B, 512 MiB at 64 KiB.
SIZES = {512: 1 * MiB, 64 * KiB: 1 * GiB + 256 * MiB}
STATUS = {ClusterType.UNALLOCATED: Status.UNALLOCATED, ClusterType.ZERO_PLAIN: Status.ZERO,
          ClusterType.ZERO_ALLOC: Status.ZERO, ClusterType.NORMAL: Status.DATA,
          ClusterType.COMPRESSED: Status.COMPRESSED}


# ---------------------------------------------------------------------------
# The reference: one cluster at a time, from the file


def reference_block_status(driver: Qcow2Driver, offset: int, length: int) -> list[Extent]:
    h, cs, bits = driver.header, driver.cluster_size, driver.header.cluster_bits
    with open(driver.filename, "rb") as f:
        l1 = decode_u64_table(os.pread(f.fileno(), h.l1_size * 8, h.l1_table_offset))
        tables: dict[int, list[int]] = {}
        out: list[Extent] = []
        pos, end = offset, offset + length
        while pos < end:
            n = min(end, (pos // cs + 1) * cs) - pos
            l2_offset = l1[(pos >> bits) // (cs // 8)] & L1E_OFFSET_MASK
            if l2_offset and l2_offset not in tables:
                tables[l2_offset] = list(decode_u64_table(os.pread(f.fileno(), cs, l2_offset)))
            entry = tables[l2_offset][(pos >> bits) % (cs // 8)] if l2_offset else 0
            merge(out, Extent(pos, n, STATUS[classify_l2(entry)], host_of(driver, entry, pos)))
            pos += n
    return out


def host_of(driver: Qcow2Driver, entry: int, guest: int) -> int | None:
    cs = driver.cluster_size
    if classify_l2(entry) is ClusterType.COMPRESSED:
        return compressed_extent(entry, driver.header.cluster_bits).host_offset
    host = entry & L2E_OFFSET_MASK
    if host % cs:
        raise CorruptImage(driver.filename,
                           f"Cluster allocation offset {host:#x} unaligned (guest offset {guest:#x})")
    return host + guest % cs if host else None


def merge(out: list[Extent], ext: Extent) -> None:
    prev = out[-1] if out else None
    if (prev is not None and prev.status is ext.status and ext.status is not Status.COMPRESSED
            and prev.end == ext.guest_offset
            and (prev.host_offset is None) == (ext.host_offset is None)
            and (ext.host_offset is None or prev.host_offset + prev.length == ext.host_offset)):
        out[-1] = Extent(prev.guest_offset, prev.length + ext.length, prev.status, prev.host_offset)
    else:
        out.append(ext)


def outcome(fn: Callable[[], list[Extent]]) -> list[Extent] | str:
    try:
        return fn()
    except CorruptImage as exc:
        return f"CorruptImage: {exc}"


def compare(path: Path, rng: random.Random, ranges: int = 40) -> None:
    with imgchain.open_chain(path, force_share=True) as chain:
        driver = chain.active.driver
        assert isinstance(driver, Qcow2Driver)
        size, cs = driver.size, driver.cluster_size
        spans = [(0, size), (0, 1), (size - 1, 1), (cs // 2, cs), (cs - 1, 2)]
        for _ in range(ranges):
            start = rng.randrange(size)
            length = min(size - start, max(1, int(rng.choice([cs, 64 * cs, size]) * rng.random())))
            spans.append((start, length))
        for start, length in spans:
            got = outcome(lambda: driver.block_status(start, length))
            want = outcome(lambda: reference_block_status(driver, start, length))
            assert got == want, f"{path.name} block_status({start}, {length})"


# ---------------------------------------------------------------------------
# Images


def windows(cs: int, size: int) -> list[int]:
    """Guest offsets the random writes crowd around: the start, an L2 boundary, the end."""
    span = cs * (cs // 8)
    return [0, span - 8 * cs, size - 24 * cs]


def random_spot(rng: random.Random, cs: int, size: int, aligned: bool) -> tuple[int, int]:
    base = rng.choice(windows(cs, size)) + rng.randrange(16) * cs
    if aligned:
        return base, rng.randrange(1, 9) * cs
    return base + rng.randrange(cs), rng.randrange(1, 4 * cs)


def qemu_io_image(tmp_path: Path, cs: int, rng: random.Random) -> Path:
    path = tmp_path / "qio.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cs}", path, str(SIZES[cs]), check=True)
    # qemu writes compressed clusters only where nothing is allocated yet: those go first
    spots = sorted({rng.choice(windows(cs, SIZES[cs])) + rng.randrange(12, 24) * cs for _ in range(12)})
    commands = [f"write -c -P {i + 1} {off} {cs}" for i, off in enumerate(spots)]
    for i in range(60):
        kind = rng.choice(["write", "write", "zero", "zero-unmap", "discard"])
        off, n = random_spot(rng, cs, SIZES[cs], aligned=kind != "write" or rng.random() < 0.5)
        commands.append({"write": f"write -P {i % 250 + 1} {off} {n}",
                         "zero": f"write -z {off} {n}",
                         "zero-unmap": f"write -z -u {off} {n}",
                         "discard": f"discard {off} {n}"}[kind])
    proc = qemu_io(path, *commands)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return path


def imgchain_image(tmp_path: Path, cs: int, rng: random.Random) -> Path:
    path = tmp_path / "ic.qcow2"
    create_image(str(path), "qcow2", SIZES[cs], cluster_size=cs)
    with imgchain.open_chain(path, writable=True) as chain:
        for i in range(60):
            off, n = random_spot(rng, cs, SIZES[cs], aligned=rng.random() < 0.5)
            if rng.random() < 0.35:
                chain.write_zeroes(off, n)
            else:
                chain.write(off, bytes([i % 250 + 1]) * n)
    return path


def random_l2_image(tmp_path: Path, cs: int, rng: random.Random) -> Path:
    """A preallocated image whose L2 tables are overwritten with random entry runs."""
    path = tmp_path / "rnd.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cs},preallocation=metadata", path,
             str(SIZES[cs]), check=True)
    with imgchain.open_chain(path, force_share=True) as chain:
        h = chain.active.driver.header  # type: ignore[attr-defined]
    with open(path, "r+b") as f:
        l1 = decode_u64_table(os.pread(f.fileno(), h.l1_size * 8, h.l1_table_offset))
        tables = [e & L1E_OFFSET_MASK for e in l1 if e & L1E_OFFSET_MASK]
        for l2_offset in tables:
            os.pwrite(f.fileno(), encode_u64_table(random_l2(rng, cs)), l2_offset)
        if cs > 512 and rng.random() < 0.7:  # one unaligned data cluster: both must fail there
            at = rng.choice(tables) + 8 * rng.randrange(cs // 8)
            os.pwrite(f.fileno(), (QCOW_OFLAG_COPIED | 123 * cs + 512).to_bytes(8, "big"), at)
        if len(l1) > 2:  # one L2 range with no table at all
            os.pwrite(f.fileno(), bytes(8), h.l1_table_offset + 8 * rng.randrange(1, len(l1)))
    return path


def random_l2(rng: random.Random, cs: int) -> array:
    """Runs of entries of one kind, with noise in the flag and reserved bits."""
    bits = cs.bit_length() - 1
    entries: list[int] = []
    host = 0
    while len(entries) < cs // 8:
        kind = rng.choice(["unalloc", "zero", "data", "data", "zero-alloc", "compressed", "continue"])
        if kind in ("data", "zero-alloc", "compressed"):
            host = rng.choice([rng.randrange(1, 1 << 20) * cs] * 8 + [
                (1 << 55) - 2 * cs,  # where the driver stops trusting "entry + cluster size"
                (1 << 56) - 3 * cs])  # the next clusters carry into bit 56
        flags = {"zero-alloc": QCOW_OFLAG_ZERO, "continue": entries[-1] & ~L2E_OFFSET_MASK if entries else 0}
        on_clusters = rng.random() < 0.3
        for _ in range(rng.randrange(1, 12)):
            noise = rng.choice([0, 0, 0, QCOW_OFLAG_COPIED, 1 << 56, 1 << 3])
            if kind == "unalloc":
                entry = noise
            elif kind == "zero":
                entry = QCOW_OFLAG_ZERO | noise
            elif kind == "compressed" and on_clusters:  # looks contiguous, yet never merges
                entry = QCOW_OFLAG_COMPRESSED | host
                host += cs
            elif kind == "compressed":
                x = 62 - (bits - 8)
                entry = QCOW_OFLAG_COMPRESSED | rng.randrange(1 << (bits - 8)) << x | rng.randrange(1 << 30)
            else:  # data, zero-alloc, or the previous entry's flags: one host cluster on
                entry = flags.get(kind, 0) | host | noise
                host += cs
            entries.append(entry & ((1 << 64) - 1))
    return array("Q", entries[:cs // 8])


MAKERS = {"qemu-io": qemu_io_image, "imgchain": imgchain_image, "random-l2": random_l2_image}


@pytest.mark.parametrize("cs", CLUSTER_SIZES, ids=["512", "64k"])
@pytest.mark.parametrize("maker", sorted(MAKERS))
def test_block_status_matches_per_cluster_reference(tmp_path: Path, maker: str, cs: int) -> None:
    for seed in range(int(os.environ.get("IMGCHAIN_SEEDS", "3"))):
        rng = random.Random(f"{maker}-{cs}-{seed}")
        work = tmp_path / str(seed)
        work.mkdir()
        compare(MAKERS[maker](work, cs, rng), rng)


def test_fully_allocated_image_is_one_extent_per_l2_table(tmp_path: Path) -> None:
    """preallocation=metadata: data everywhere; qemu interleaves L2 tables with the
    data, so runs break only where one table's clusters end."""
    path = tmp_path / "full.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "preallocation=metadata", path, "1280M", check=True)
    with imgchain.open_chain(path) as chain:
        driver = chain.active.driver
        extents = driver.block_status(0, chain.size)
        assert extents == reference_block_status(driver, 0, chain.size)  # type: ignore[arg-type]
    assert [e.status for e in extents] == [Status.DATA] * 3
    assert [e.length for e in extents] == [512 * MiB, 512 * MiB, 256 * MiB]
    proc = subprocess.run(["qemu-img", "map", "--output=json", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.count('"data": true') == 3
