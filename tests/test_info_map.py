"""imgchain.info and imgchain.map against `qemu-img info` / `qemu-img map` 7.2.

Every image here is built with qemu-img/qemu-io or with imgchain in tmp_path
(or is a fixture of testimages/), and then both tools look at it from the
same working directory with the same relative names: the JSON of
`image_info` (with and without --backing-chain) and of `map_chain` must equal
qemu-img's, key order included (the CLI prints the dicts as they are), and
`human_info`/`human_map` must equal qemu-img's human output line for line.
`actual-size` is compared exactly: both stat the same file. The randomized
chains run 8 seeds each; IMGCHAIN_SEEDS=N runs N.
"""

from __future__ import annotations

import json
import os
import re
import random
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import imgchain
from imgchain.create import create_image
from imgchain.errors import BackingError, ImgchainError
from imgchain.info import (
    full_backing_filename,
    human_info,
    image_info,
    size_to_str,
)
from imgchain.locks import ImageLockedError
from imgchain.map import MapError, human_map, map_chain
from imgchain.qcow2 import read_snapshot_table

from .conftest import FIXTURES, REPO, qemu_img, qemu_io, wait_until_write_locked

MANIFEST: dict[str, dict[str, Any]] = json.loads((REPO / "testimages" / "manifest.json").read_text())
MiB = 1 << 20


# ---------------------------------------------------------------------------
# Comparison helpers


def _ordered(value: Any) -> Any:
    """A form where dict key order matters for ==."""
    if isinstance(value, dict):
        return [(k, _ordered(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [_ordered(v) for v in value]
    return value


def qemu_json(*args: str) -> Any:
    proc = qemu_img(*args, "--output=json", check=True)
    return json.loads(proc.stdout)


def with_real_paths(qemu_text: str) -> str:
    """qemu-img's human info with each backing file's actual path shown as
    imgchain shows it: absolute, symlinks followed (where qemu-img shows the
    lexical path, and nothing when that equals the name)."""
    lines = []
    for line in qemu_text.splitlines(keepends=True):
        m = re.fullmatch(r"backing file: (.*?)(?: \(actual path: (.*)\))?\n", line)
        if m and "cannot determine" not in line:
            name, actual = m.group(1), m.group(2) or m.group(1)
            real = os.path.realpath(actual)
            line = f"backing file: {name}" + (f" (actual path: {real})" if real != name else "") + "\n"
        lines.append(line)
    return "".join(lines)


def assert_info_matches(name: str) -> None:
    """image_info and human_info of `name` (cwd-relative) equal qemu-img's."""
    for chain in (False, True):
        flags = ("--backing-chain",) if chain else ()
        ours = image_info(name, backing_chain=chain)
        theirs = qemu_json("info", *flags, name)
        assert ours == theirs, f"info {flags} {name}"
        assert _ordered(ours) == _ordered(theirs), f"key order, info {flags} {name}"
        assert human_info(ours) == with_real_paths(qemu_img("info", *flags, name, check=True).stdout)


def assert_map_matches(name: str) -> list[dict[str, Any]]:
    """map_chain and human_map of `name` equal qemu-img's; returns the entries."""
    ours = map_chain(name)
    assert _ordered(ours) == _ordered(qemu_json("map", name)), f"map {name}"
    human = qemu_img("map", name)
    if human.returncode == 0:
        assert human_map(ours, name) == human.stdout
    else:
        with pytest.raises(MapError) as err:
            human_map(ours, name)
        assert human.stderr == f"qemu-img: {err.value}\n"
        assert err.value.output == human.stdout
    return ours


def assert_matches(name: str) -> list[dict[str, Any]]:
    assert_info_matches(name)
    return assert_map_matches(name)


def io(image: str, *commands: str, fmt: str | None = None) -> None:
    proc = qemu_io(image, *commands, fmt=fmt)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def make_base_and_overlay() -> None:
    """QCOW2-SUBSET.md §6.1, verbatim."""
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=65536", "base.qcow2", "64M", check=True)
    io("base.qcow2", "write -P 0xaa 0 64k", "write -P 0xbb 1M 128k", "write -P 0xcc 2M 64k",
       "write -P 0xdd 33M 64k", "discard 1088k 64k")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=65536", "-b", "base.qcow2", "-F", "qcow2",
             "overlay.qcow2", check=True)
    io("overlay.qcow2", "write -P 0x11 64k 64k", "write -z 1M 64k", "discard 2M 64k",
       "write -P 0x22 3M 4k", "write -P 0x33 4M 128k", "write -z 4M 64k",
       "write -z -u 4160k 64k", "write -z 33M 64k")


# ---------------------------------------------------------------------------
# qemu-made images


def test_subset_doc_base_and_overlay(cwd: Path) -> None:
    make_base_and_overlay()
    assert_matches("base.qcow2")
    entries = assert_matches("overlay.qcow2")
    by_start = {e["start"]: e for e in entries}
    # ZERO_ALLOC keeps its host cluster and shows it; ZERO_PLAIN has no offset.
    assert by_start[4194304] == {"start": 4194304, "length": 65536, "depth": 0, "present": True,
                                 "zero": True, "data": False, "offset": 458752}
    assert "offset" not in by_start[4259840]
    assert entries[-1]["depth"] == 1 and not entries[-1]["present"]


def test_overlay_info_without_its_backing(cwd: Path) -> None:
    make_base_and_overlay()
    os.rename("base.qcow2", "gone.qcow2")
    ours = image_info("overlay.qcow2")
    assert _ordered(ours) == _ordered(qemu_json("info", "overlay.qcow2"))
    assert human_info(ours) == with_real_paths(qemu_img("info", "overlay.qcow2", check=True).stdout)
    proc = qemu_img("info", "--backing-chain", "overlay.qcow2")
    assert proc.returncode == 1
    with pytest.raises(BackingError) as err:
        image_info("overlay.qcow2", backing_chain=True)
    assert proc.stderr == f"qemu-img: {err.value}\n"
    with pytest.raises(ImgchainError):
        map_chain("overlay.qcow2")


def test_missing_image(cwd: Path) -> None:
    proc = qemu_img("info", "nothing.qcow2")
    with pytest.raises(ImgchainError) as err:
        image_info("nothing.qcow2")
    assert proc.stderr == f"qemu-img: {err.value}\n"


def test_consecutive_zero_alloc_clusters_merge(cwd: Path) -> None:
    qemu_img("create", "-f", "qcow2", "img.qcow2", "8M", check=True)
    io("img.qcow2", "write -P 1 0 256k", "write -z 64k 128k", "write -P 2 1M 64k",
       "write -P 3 2M 64k", "write -z 1M 64k", "write -z 2M 64k")
    entries = assert_matches("img.qcow2")
    assert [e["length"] for e in entries if e["zero"] and "offset" in e] == [131072, 65536, 65536]


@pytest.mark.parametrize("holes", [True, False], ids=["sparse-raw", "dense-raw"])
def test_raw_base_under_qcow2_overlays(cwd: Path, holes: bool) -> None:
    if holes:
        qemu_img("create", "-f", "raw", "base.raw", "4M", check=True)
        io("base.raw", "write -P 0x5a 0 64k", "write -P 0x5b 200k 12k", "write -P 0x5c 1M 192k",
           "write -P 0x5d 4092k 4k", fmt="raw")
    else:
        Path("base.raw").write_bytes(bytes(range(256)) * (4 * MiB // 256))
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2", check=True)
    io("mid.qcow2", "write -P 1 64k 64k", "write -z 1M 64k", "write -P 2 260k 8k",
       "write -P 3 3M 128k")
    qemu_img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", check=True)
    io("top.qcow2", "write -P 4 0 4k", "discard 3M 64k", "write -z 1088k 64k")
    for name in ("base.raw", "mid.qcow2", "top.qcow2"):
        assert_matches(name)
    depth2 = [e for e in map_chain("top.qcow2") if e["depth"] == 2]
    assert depth2 and all(e["present"] and "offset" in e for e in depth2)
    assert any(e["zero"] for e in depth2) == holes


def test_three_layers_relative_names_in_subdirectories(cwd: Path) -> None:
    os.makedirs("sub")
    os.makedirs("other")
    qemu_img("create", "-f", "qcow2", "sub/base.qcow2", "8M", check=True)
    io("sub/base.qcow2", "write -P 0xa0 0 1M", "write -P 0xa1 2M 64k", "write -P 0xa2 7M 1M")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "sub/mid.qcow2", check=True)
    io("sub/mid.qcow2", "write -P 0xb0 512k 1M", "write -z 2M 64k", "write -P 0xb1 5M 4k")
    qemu_img("create", "-f", "qcow2", "-b", "../sub/mid.qcow2", "-F", "qcow2", "other/top.qcow2",
             check=True)
    io("other/top.qcow2", "write -P 0xc0 768k 64k", "write -z 7M 64k")
    assert_matches("other/top.qcow2")
    assert_matches("./other//top.qcow2")
    assert_matches(str(cwd / "other" / "top.qcow2"))
    info = image_info("other/top.qcow2", backing_chain=True)
    assert [i["filename"] for i in info] == [
        "other/top.qcow2", "other/../sub/mid.qcow2", "other/../sub/base.qcow2"]


def test_absolute_backing_name(cwd: Path) -> None:
    qemu_img("create", "-f", "qcow2", "base.qcow2", "1M", check=True)
    io("base.qcow2", "write -P 1 0 64k")
    qemu_img("create", "-f", "qcow2", "-b", str(cwd / "base.qcow2"), "-F", "qcow2", "top.qcow2",
             check=True)
    assert_matches("top.qcow2")


def test_overlays_larger_than_their_backing(cwd: Path) -> None:
    qemu_img("create", "-f", "qcow2", "base.qcow2", "1M", check=True)
    io("base.qcow2", "write -P 1 0 1M")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2", "2M", check=True)
    io("mid.qcow2", "write -P 2 960k 128k")
    qemu_img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "4M", check=True)
    io("top.qcow2", "write -P 3 3M 64k")
    entries = assert_matches("top.qcow2")
    # Past a backing's end the layer above answers: zeros, not present.
    tail = [e for e in entries if not e["present"]]
    assert [(e["start"], e["depth"]) for e in tail] == [(1088 * 1024, 1), (2 * MiB, 0), (3 * MiB + 65536, 0)]


@pytest.mark.parametrize("cluster_size", ["512", "2M"])
def test_small_and_large_clusters(cwd: Path, cluster_size: str) -> None:
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", "base.qcow2", "16M",
             check=True)
    io("base.qcow2", "write -P 1 0 4k", "write -P 2 1M 1536", "write -P 3 5M 3M", "write -z 6M 512",
       "discard 9M 2M")
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", "-b", "base.qcow2",
             "-F", "qcow2", "top.qcow2", check=True)
    io("top.qcow2", "write -P 4 512 512", "write -z 5M 2M", "write -P 5 15M 4k")
    assert_matches("base.qcow2")
    assert_matches("top.qcow2")


def test_compressed_clusters(cwd: Path) -> None:
    data = bytearray(MiB)
    data[0:196608] = b"\x11" * 196608
    data[262144:327680] = os.urandom(65536)  # incompressible: stored plain
    data[458752:491520] = b"\x22" * 32768
    Path("src.raw").write_bytes(bytes(data))
    qemu_img("convert", "-c", "-O", "qcow2", "src.raw", "comp.qcow2", check=True)
    entries = assert_matches("comp.qcow2")
    compressed = [e for e in entries if e["data"] and "offset" not in e]
    assert compressed and all(e["present"] and not e["zero"] for e in compressed)
    qemu_img("create", "-f", "qcow2", "-b", "comp.qcow2", "-F", "qcow2", "top.qcow2", check=True)
    io("top.qcow2", "write -P 9 64k 64k")
    assert_matches("top.qcow2")


def test_metadata_preallocation_shows_file_holes_as_zero(cwd: Path) -> None:
    qemu_img("create", "-f", "qcow2", "-o", "preallocation=metadata", "pre.qcow2", "32M", check=True)
    io("pre.qcow2", "write -P 1 1M 64k", "write -z 2M 64k", "write -P 2 3M 4k")
    entries = assert_matches("pre.qcow2")
    assert any(e["zero"] and e["data"] for e in entries)
    qemu_img("create", "-f", "qcow2", "-o", "preallocation=falloc", "falloc.qcow2", "4M", check=True)
    assert_matches("falloc.qcow2")


def test_snapshots_are_listed(cwd: Path) -> None:
    qemu_img("create", "-f", "qcow2", "snap.qcow2", "4M", check=True)
    io("snap.qcow2", "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "first", "snap.qcow2", check=True)
    io("snap.qcow2", "write -P 2 0 64k")
    qemu_img("snapshot", "-c", "a-much-longer-snapshot-name", "snap.qcow2", check=True)
    qemu_img("create", "-f", "qcow2", "-b", "snap.qcow2", "-F", "qcow2", "top.qcow2", check=True)
    qemu_img("snapshot", "-c", "top-snap", "top.qcow2", check=True)
    assert_matches("top.qcow2")
    assert [s["name"] for s in image_info("snap.qcow2")["snapshots"]] == [  # type: ignore[index]
        "first", "a-much-longer-snapshot-name"]


def test_snapshot_without_icount() -> None:
    class FakeFile:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def pread(self, offset: int, length: int) -> bytes:
            return self.data[offset:offset + length]

    entry = struct.pack(">QIHHIIQII", 0x50000, 1, 1, 2, 1700000000, 5, 3_723_456_000_000, 7, 16)
    entry += (1 << 33).to_bytes(8, "big") + (4 * MiB).to_bytes(8, "big") + b"1" + b"s1"
    header = imgchain.formats.qcow2_header.Qcow2Header(
        cluster_bits=16, size=4 * MiB, l1_size=1, l1_table_offset=0x30000,
        refcount_table_offset=0x10000, refcount_table_clusters=1, nb_snapshots=1,
        snapshots_offset=0x60000)
    table = read_snapshot_table(FakeFile(bytes(0x60000) + entry), header, "x.qcow2")  # type: ignore[arg-type]
    assert [(s.id, s.name, s.date_sec, s.date_nsec, s.vm_clock_nsec, s.vm_state_size, s.icount)
            for s in table.snapshots] == [("1", "s1", 1700000000, 5, 3_723_456_000_000, 1 << 33, None)]
    assert table.size == len(entry)


def test_persistent_bitmaps(cwd: Path) -> None:
    qemu_img("create", "-f", "qcow2", "bm.qcow2", "4M", check=True)
    qemu_img("bitmap", "--add", "bm.qcow2", "bm0", check=True)
    qemu_img("bitmap", "--add", "-g", "128k", "--disable", "bm.qcow2", "bm1", check=True)
    io("bm.qcow2", "write -P 1 0 64k")
    assert_matches("bm.qcow2")


def _set_incompat_bit(path: str, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(72)
        value = int.from_bytes(f.read(8), "big") | (1 << bit)
        f.seek(72)
        f.write(value.to_bytes(8, "big"))


@pytest.mark.parametrize("bit", [0, 1], ids=["dirty", "corrupt"])
def test_dirty_and_corrupt_flags(cwd: Path, bit: int) -> None:
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on", "img.qcow2", "4M", check=True)
    io("img.qcow2", "write -P 1 0 64k")
    _set_incompat_bit("img.qcow2", bit)
    assert_matches("img.qcow2")


def test_looping_chain(cwd: Path) -> None:
    qemu_img("create", "-f", "qcow2", "a.qcow2", "1M", check=True)
    qemu_img("create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2", check=True)
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2", check=True)
    single = image_info("b.qcow2")
    assert _ordered(single) == _ordered(qemu_json("info", "b.qcow2"))
    proc = qemu_img("info", "--backing-chain", "b.qcow2")
    assert proc.returncode == 1
    with pytest.raises(BackingError) as err:
        image_info("b.qcow2", backing_chain=True)
    assert str(err.value) == "Backing file 'b.qcow2' creates an infinite loop"
    assert proc.stderr == f"qemu-img: {err.value}.\n"
    # qemu-img map never returns on this chain; imgchain refuses it.
    with pytest.raises(BackingError):
        map_chain("b.qcow2")


@pytest.fixture
def held_by_qemu(cwd: Path) -> Iterator[str]:
    """top.qcow2 (over base.qcow2) kept open read-write by qemu-io; yields its name."""
    make_base_and_overlay()
    proc = subprocess.Popen(["qemu-io", "-c", "sleep 60000", "overlay.qcow2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_write_locked("overlay.qcow2", proc)
        yield "overlay.qcow2"
    finally:
        proc.kill()
        proc.wait()


def test_locked_chain_needs_force_share(held_by_qemu: str) -> None:
    name = held_by_qemu
    with pytest.raises(ImageLockedError, match='Failed to get shared "write" lock'):
        image_info(name)
    with pytest.raises(ImageLockedError):
        image_info(name, backing_chain=True)
    with pytest.raises(ImageLockedError):
        map_chain(name)
    for chain in (False, True):
        flags = ("--backing-chain",) if chain else ()
        ours = image_info(name, backing_chain=chain, force_share=True)
        assert _ordered(ours) == _ordered(qemu_json("info", "-U", *flags, name))
    entries = map_chain(name, force_share=True)
    assert _ordered(entries) == _ordered(qemu_json("map", "-U", name))
    assert human_map(entries, name) == qemu_img("map", "-U", name, check=True).stdout
    # A backing file of a chain qemu writes is only read-shared: info works.
    assert _ordered(image_info("base.qcow2")) == _ordered(qemu_json("info", "base.qcow2"))


def test_zero_size_image(cwd: Path) -> None:
    qemu_img("create", "-f", "qcow2", "zero.qcow2", "0", check=True)
    Path("zero.raw").write_bytes(b"")
    assert assert_matches("zero.qcow2") == [
        {"start": 0, "length": 0, "depth": 0, "present": False, "zero": False, "data": False}]
    assert_matches("zero.raw")


def test_raw_size_not_a_sector_multiple(cwd: Path) -> None:
    Path("odd.raw").write_bytes(os.urandom(1000))
    qemu_img("create", "-f", "qcow2", "-b", "odd.raw", "-F", "raw", "top.qcow2", "2k", check=True)
    assert_matches("odd.raw")
    assert_matches("top.qcow2")


@pytest.mark.parametrize("size", [512, 1536, 1023 * 1024, 1000 * 1024 * 1024, 3 << 40])
def test_human_sizes(cwd: Path, size: int) -> None:
    with open("img.raw", "wb") as f:
        f.truncate(size)
    assert_info_matches("img.raw")


def test_size_to_str() -> None:
    assert [size_to_str(v) for v in (0, 1, 999, 1000, 1024, 1536, 66060288, 1 << 60)] == [
        "0 B", "1 B", "999 B", "0.977 KiB", "1 KiB", "1.5 KiB", "63 MiB", "1 EiB"]


def test_full_backing_filename() -> None:
    assert full_backing_filename("ov.qcow2", "b.qcow2") == "b.qcow2"
    assert full_backing_filename("./sub//ov.qcow2", "b.qcow2") == "./sub//b.qcow2"
    assert full_backing_filename("other/up.qcow2", "../sub/x") == "other/../sub/x"
    assert full_backing_filename("/a/ov.qcow2", "/abs/b") == "/abs/b"
    assert full_backing_filename("/a/ov.qcow2", "nbd:host:10809") == "nbd:host:10809"


def _random_ops(rng: random.Random, size: int, count: int) -> list[str]:
    ops = []
    for _ in range(count):
        length = rng.choice([512, 4096, 65536, 131072, rng.randrange(1, 512) * 512])
        offset = rng.randrange(0, max(1, (size - length) // 512)) * 512
        kind = rng.choice(["write -P 0x{:02x}".format(rng.randrange(1, 256)), "write -z",
                           "write -z -u", "discard"])
        ops.append(f"{kind} {offset} {min(length, size - offset)}")
    return ops


@pytest.mark.parametrize("seed", range(int(os.environ.get("IMGCHAIN_SEEDS", "8"))))
def test_random_chains(cwd: Path, seed: int) -> None:
    rng = random.Random(seed)
    names = []
    for layer in range(rng.randrange(1, 4)):
        size = rng.choice([1, 2, 3]) * MiB + rng.choice([0, 512, 65536])
        name = f"l{layer}.qcow2"
        if layer == 0 and rng.random() < 0.3:
            name = "l0.raw"
            qemu_img("create", "-f", "raw", name, str(size), check=True)
            io(name, *(op for op in _random_ops(rng, size, 6) if "-u" not in op), fmt="raw")
        else:
            backing = ["-b", names[-1], "-F", "raw" if names[-1].endswith(".raw") else "qcow2"] \
                if names else []
            cluster = rng.choice(["512", "4k", "64k"])
            qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cluster}", *backing, name,
                     str(size), check=True)
            io(name, *_random_ops(rng, size, 12))
        names.append(name)
    assert_matches(names[-1])


# ---------------------------------------------------------------------------
# imgchain-made images


@pytest.mark.parametrize("seed", range(int(os.environ.get("IMGCHAIN_SEEDS", "8"))))
def test_random_imgchain_top(cwd: Path, seed: int) -> None:
    rng = random.Random(1000 + seed)
    size = rng.choice([1, 2]) * MiB
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={rng.choice(['4k', '64k'])}",
             "base.qcow2", str(size), check=True)
    io("base.qcow2", *_random_ops(rng, size, 8))
    create_image("top.qcow2", backing_file="base.qcow2", size=size + rng.choice([0, MiB]),
                 cluster_size=rng.choice([512, 4096, 65536]))
    with imgchain.open_chain("top.qcow2", writable=True) as chain:
        for _ in range(10):
            offset = rng.randrange(chain.size - 512)
            length = min(rng.choice([1, 100, 4096, 70000, 200000]), chain.size - offset)
            if rng.random() < 0.3:
                chain.write_zeroes(offset, length)
            else:
                chain.write(offset, bytes([rng.randrange(1, 256)]) * length)
    assert_matches("top.qcow2")


def test_imgchain_made_chain(cwd: Path) -> None:
    create_image("base.qcow2", "qcow2", 8 * MiB, cluster_size=4096)
    with imgchain.open_chain("base.qcow2", writable=True) as chain:
        chain.write(0, b"\x01" * 65536)
        chain.write(MiB + 100, b"\x02" * 5000)
        chain.write_zeroes(16384, 8192)
        chain.write(3 * MiB, b"\x03" * 4096)
        chain.write(3 * MiB + 4096, b"\x04" * 4096)
    create_image("raw.raw", "raw", 8 * MiB)
    create_image("over-raw.qcow2", backing_file="raw.raw")
    create_image("top.qcow2", backing_file="base.qcow2", size=16 * MiB)
    with imgchain.open_chain("top.qcow2", writable=True) as chain:
        chain.write(4096, b"\x05" * 4096)
        chain.write_zeroes(3 * MiB, 65536)
        chain.write(8 * MiB - 512, b"\x06" * 1024)
        chain.write(12 * MiB, b"\x07" * 70000)
    for name in ("base.qcow2", "over-raw.qcow2", "top.qcow2"):
        assert_matches(name)


def test_imgchain_overlay_over_qemu_base(cwd: Path) -> None:
    make_base_and_overlay()
    create_image("mine.qcow2", backing_file="overlay.qcow2", cluster_size=512)
    with imgchain.open_chain("mine.qcow2", writable=True) as chain:
        chain.write(2 * MiB + 512, b"\x09" * 1024)
        chain.write_zeroes(0, 65536)
        chain.write(63 * MiB, b"\x0a" * 512)
    assert_matches("mine.qcow2")


def test_sparse_64g_chain(cwd: Path) -> None:
    """Work per extent: a 64 GiB three-layer chain with scattered writes."""
    qemu_img("create", "-f", "qcow2", "l0.qcow2", "64G", check=True)
    for layer in range(3):
        name = f"l{layer}.qcow2"
        if layer:
            qemu_img("create", "-f", "qcow2", "-b", f"l{layer - 1}.qcow2", "-F", "qcow2", name,
                     check=True)
        io(name, *(f"write -P {layer + 1} {i * 2048 + layer * 512}M 64k" for i in range(32)),
           f"write -z {40 + layer}G 1G")
    assert_matches("l2.qcow2")


# ---------------------------------------------------------------------------
# Fixtures of testimages/


def _fixture_names() -> list[str]:
    names = []
    for name in sorted(MANIFEST):
        try:
            map_chain(str(FIXTURES / name))
        except (ImgchainError, imgchain.FormatError):
            continue  # outside the subset (test_rejections covers those)
        names.append(name)
    return names


@pytest.mark.parametrize("name", _fixture_names())
def test_fixture(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(FIXTURES)
    assert_matches(name)
