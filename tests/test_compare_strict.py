"""`imgchain compare` (and `-s`) against the real `qemu-img compare` 7.2.

Both tools compare the same pairs, in both orders, and must print the same
line(s) and exit with the same code. The images have what strict mode is
about: zero clusters against unallocated zeros, raw bases with holes, raw
and qcow2 copies made by `qemu-img convert`, backing files shorter than
their overlay, compressed clusters, images of different sizes. Randomized
chains run 6 seeds; IMGCHAIN_SEEDS=N runs N. The whole matrix goes through
the Python API (one process); a few pairs go through the CLI too.
"""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import pytest

from imgchain.compare import compare_images

from .conftest import qemu_img
from .mounting import cli
from .random_chains import build_random_chain, create, io

MiB = 1 << 20
SEEDS = int(os.environ.get("IMGCHAIN_SEEDS", "6"))


def assert_same_as_qemu(a: str, b: str) -> None:
    """Both orders, strict and not: our message and exit code are qemu-img's."""
    for first, second in ((a, b), (b, a)):
        for strict in (True, False):
            theirs = qemu_img("compare", *(["-s"] if strict else []), first, second)
            result = compare_images(first, second, strict)
            ours = (0 if result.identical else 1, result.message + "\n")
            assert ours == (theirs.returncode, theirs.stdout), (strict, first, second)


@pytest.fixture
def images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A raw base with holes <- mid (zero clusters) <- top (4 KiB clusters),
    their converted copies, zero clusters against unallocated zeros, a
    backing shorter than its overlay, compressed clusters, a longer raw."""
    monkeypatch.chdir(tmp_path)
    create("base.raw", "4M")
    io("base.raw", "write -P 0xaa 0 1M", "write -P 0xbb 2M 64k", fmt="raw")
    create("mid.qcow2", None, "-b", "base.raw", "-F", "raw")
    io("mid.qcow2", "write -P 0x11 512k 128k", "write -z 1M 256k", "write -z 0 64k")
    create("top.qcow2", None, "-o", "cluster_size=4096", "-b", "mid.qcow2", "-F", "qcow2")
    io("top.qcow2", "write -P 0x22 3M 8k", "write -z 2M 64k", "write -P 0 64k 64k")
    qemu_img("convert", "-O", "raw", "top.qcow2", "conv.raw", check=True)
    qemu_img("convert", "-O", "qcow2", "top.qcow2", "conv.qcow2", check=True)
    qemu_img("convert", "-c", "-O", "qcow2", "top.qcow2", "compressed.qcow2", check=True)
    create("zeroed.qcow2", "4M")
    io("zeroed.qcow2", "write -P 1 0 64k", "write -z 1M 1M", "write -P 2 3M 1M")
    create("sparse.qcow2", "4M")
    io("sparse.qcow2", "write -P 1 0 64k", "write -P 2 3M 1M")
    create("small.qcow2", "1M")
    io("small.qcow2", "write -P 5 0 512k")
    create("big.qcow2", "4M", "-b", "small.qcow2", "-F", "qcow2")
    io("big.qcow2", "write -P 6 3M 64k")
    qemu_img("convert", "-O", "qcow2", "big.qcow2", "bigconv.qcow2", check=True)
    create("differs.qcow2", None, "-b", "top.qcow2", "-F", "qcow2")
    io("differs.qcow2", "write -P 0x33 1536k 512")
    create("longer.raw", "5M")
    with open("longer.raw", "r+b") as f:
        f.write(Path("conv.raw").read_bytes())
    return ["base.raw", "mid.qcow2", "top.qcow2", "conv.raw", "conv.qcow2", "compressed.qcow2",
            "zeroed.qcow2", "sparse.qcow2", "small.qcow2", "big.qcow2", "bigconv.qcow2",
            "differs.qcow2", "longer.raw"]


def test_zero_clusters_against_the_converted_copy_is_a_status_mismatch(images: list[str]) -> None:
    """The issue's case: zeros stored as zero clusters vs left unallocated."""
    theirs = qemu_img("compare", "-s", "zeroed.qcow2", "sparse.qcow2")
    assert (theirs.returncode, theirs.stdout) == (1, f"Strict mode: Offset {MiB} block status mismatch!\n")
    ours = cli("compare", "-s", "zeroed.qcow2", "sparse.qcow2")
    assert (ours.returncode, ours.stdout, ours.stderr) == (1, theirs.stdout, "")
    assert cli("compare", "zeroed.qcow2", "sparse.qcow2").stdout == "Images are identical.\n"


def test_every_pair_both_orders_as_qemu_img(images: list[str]) -> None:
    for a, b in itertools.combinations(images, 2):
        assert_same_as_qemu(a, b)


@pytest.mark.parametrize("pair", [("top.qcow2", "conv.raw"), ("top.qcow2", "conv.qcow2"),
                                  ("big.qcow2", "bigconv.qcow2"), ("conv.raw", "longer.raw"),
                                  ("top.qcow2", "differs.qcow2"), ("conv.qcow2", "compressed.qcow2")])
def test_cli_prints_what_qemu_img_prints(images: list[str], pair: tuple[str, str]) -> None:
    for flags in (["-s"], []):
        for a, b in (pair, pair[::-1]):
            theirs = qemu_img("compare", *flags, a, b)
            ours = cli("compare", *flags, a, b)
            assert (ours.returncode, ours.stdout, ours.stderr) == (theirs.returncode, theirs.stdout, "")


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_chains_compare_as_qemu_img(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    monkeypatch.chdir(tmp_path)
    names = build_random_chain(random.Random(seed))
    qemu_img("convert", "-O", "raw", names[-1], "copy.raw", check=True)
    qemu_img("convert", "-O", "qcow2", names[-1], "copy.qcow2", check=True)
    images = [names[-1], "copy.raw", "copy.qcow2", *names[-2:-1]]  # and the layer below the top
    for a, b in itertools.combinations(images, 2):
        assert_same_as_qemu(a, b)
