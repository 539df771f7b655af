"""`imgchain map --output json` prints what `qemu-img map --output=json` 7.2
prints, byte for byte: one entry per line, `[` before the first, `]` after
the last.

The chains have zero clusters (plain and with a kept cluster), unallocated
ranges, raw bases with holes, backing files shorter than their overlay,
compressed clusters, a metadata-preallocated image, and many small extents
spread over several L2 tables. Both tools run from the chain's folder on the
same relative name. Randomized chains run 6 seeds; IMGCHAIN_SEEDS=N runs N.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from imgchain.map import map_json

from .conftest import qemu_img
from .mounting import cli
from .random_chains import build_random_chain, io

SEEDS = int(os.environ.get("IMGCHAIN_SEEDS", "6"))


def assert_map_text_matches(name: str) -> str:
    theirs = qemu_img("map", "--output=json", name)
    assert theirs.returncode == 0, theirs.stderr
    ours = cli("map", "--output", "json", name)
    assert (ours.returncode, ours.stderr) == (0, "")
    assert ours.stdout == theirs.stdout
    assert map_json(name) == theirs.stdout
    return ours.stdout


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_chain_with_zero_clusters_holes_and_a_raw_base(cwd: Path) -> None:
    qemu_img("create", "-q", "-f", "raw", "base.raw", "8M", check=True)
    io("base.raw", "write -P 0xaa 0 1M", "write -P 0xbb 5M 64k", fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2", check=True)
    io("mid.qcow2", "write -P 0x11 512k 128k", "write -z 1M 256k", "write -z 0 64k", "discard 5M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "mid.qcow2", "-F", "qcow2",
             "top.qcow2", check=True)
    io("top.qcow2", "write -P 0x22 3M 8k", "write -z 2M 64k", "write -z -u 6M 64k", "write -P 0x33 6M 4k",
       "write -z 6M 4k", "write -P 0 7M 64k")
    text = assert_map_text_matches("top.qcow2")
    assert text.startswith('[{ "start": 0, ') and text.endswith("}]\n")
    assert text.count("\n") == text.count("{")  # one entry per line
    for layer in ("mid.qcow2", "base.raw"):
        assert_map_text_matches(layer)


def test_backing_shorter_than_its_overlay_and_compressed_clusters(cwd: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", "small.qcow2", "1M", check=True)
    io("small.qcow2", "write -P 5 0 512k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "small.qcow2", "-F", "qcow2", "big.qcow2", "4M", check=True)
    io("big.qcow2", "write -P 6 3M 64k")
    assert_map_text_matches("big.qcow2")
    qemu_img("convert", "-c", "-O", "qcow2", "big.qcow2", "compressed.qcow2", check=True)
    assert_map_text_matches("compressed.qcow2")


def test_preallocated_and_empty_images(cwd: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", "pre.qcow2", "8M", check=True)
    io("pre.qcow2", "write -P 1 1M 64k")
    assert_map_text_matches("pre.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=falloc,cluster_size=512", "falloc.qcow2", "1M",
             check=True)  # data contiguous across L2 tables of 32 KiB: entries merge across them
    io("falloc.qcow2", "write -P 1 100k 200k", "write -z 500k 100k")
    assert assert_map_text_matches("falloc.qcow2").count("\n") < 10
    qemu_img("create", "-q", "-f", "qcow2", "empty.qcow2", "0", check=True)
    assert assert_map_text_matches("empty.qcow2") == \
        '[{ "start": 0, "length": 0, "depth": 0, "present": false, "zero": false, "data": false}]\n'


def test_many_extents_over_several_l2_tables(cwd: Path) -> None:
    """Scattered 4 KiB writes in three layers of 512-byte-cluster images: an
    L2 table spans 32 KiB, so the map crosses thousands of tables."""
    rng = random.Random(3)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "l0.qcow2", "64M", check=True)
    for i in (1, 2):
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", f"l{i - 1}.qcow2", "-F", "qcow2",
                 f"l{i}.qcow2", check=True)
    for i in range(3):
        writes = [f"write -{'z' if rng.random() < 0.2 else 'P 7'} {rng.randrange(16384) * 4096} 4k"
                  for _ in range(1000)]
        io(f"l{i}.qcow2", *writes)
    assert assert_map_text_matches("l2.qcow2").count("\n") > 4096  # the command writes 4096 entries at a time


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_chains_map_as_qemu_img(cwd: Path, seed: int) -> None:
    top = build_random_chain(random.Random(seed))[-1]
    theirs = qemu_img("map", "--output=json", top)
    assert theirs.returncode == 0, theirs.stderr
    assert map_json(top) == theirs.stdout
