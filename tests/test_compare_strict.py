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

from .conftest import qemu_img, qemu_io
from .mounting import cli

MiB = 1 << 20
SEEDS = int(os.environ.get("IMGCHAIN_SEEDS", "6"))


def io(image: str, *commands: str, fmt: str = "qcow2") -> None:
    proc = qemu_io(image, *commands, fmt=fmt)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


def create(name: str, size: int | str | None, *options: str) -> None:
    """qemu-img create; no size: the backing's."""
    fmt = "raw" if name.endswith(".raw") else "qcow2"
    qemu_img("create", "-q", "-f", fmt, *options, name, *([] if size is None else [str(size)]), check=True)


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


def build_random(rng: random.Random) -> list[str]:
    """A random chain of 1-4 layers (raw or qcow2 base, mixed cluster sizes,
    backings sometimes shorter, random writes, zero writes and discards),
    its raw and qcow2 copies, and the layer below the top."""
    size = rng.choice([4, 8]) * MiB
    raw_base = rng.random() < 0.5
    names = ["l0.raw" if raw_base else "l0.qcow2"]
    create(names[0], size if rng.random() < 0.7 else size // 2,
           *([] if raw_base else ["-o", f"cluster_size={rng.choice([4096, 65536])}"]))
    for i in range(1, rng.randint(1, 4)):
        layer_size = size if rng.random() < 0.8 else size - rng.choice([1, 2]) * MiB // 2
        create(f"l{i}.qcow2", layer_size, "-o", f"cluster_size={rng.choice([4096, 65536, 512 * 1024])}",
               "-b", names[-1], "-F", "raw" if i == 1 and raw_base else "qcow2")
        names.append(f"l{i}.qcow2")
    for name in names:
        fmt = "raw" if name.endswith(".raw") else "qcow2"
        limit = os.path.getsize(name) if fmt == "raw" else int(
            qemu_img("info", "--output=json", name).stdout.split('"virtual-size": ')[1].split(",")[0])
        commands = []
        for _ in range(rng.randint(0, 8)):
            offset = rng.randrange(limit // 4096) * 4096
            length = min(rng.choice([4096, 65536, 299520, MiB]), limit - offset)
            kind = rng.random()
            if kind < 0.5:
                commands.append(f"write -P {rng.randrange(256)} {offset} {length}")
            elif kind < 0.8:
                commands.append(f"write -z {offset} {length}")
            elif fmt == "qcow2":
                commands.append(f"discard {offset} {length}")
        if commands:
            io(name, *commands, fmt=fmt)
    top = names[-1]
    qemu_img("convert", "-O", "raw", top, "copy.raw", check=True)
    qemu_img("convert", "-O", "qcow2", top, "copy.qcow2", check=True)
    return [top, "copy.raw", "copy.qcow2", *names[-2:-1]]


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_chains_compare_as_qemu_img(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    monkeypatch.chdir(tmp_path)
    images = build_random(random.Random(seed))
    for a, b in itertools.combinations(images, 2):
        assert_same_as_qemu(a, b)
