"""Crash safety of the writer: a process killed at any point leaves images that
qemu-img checks as clean or leaking only, holding everything flushed before the kill."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

import imgchain
from imgchain.create import create_image

from .conftest import qemu_img

SIZE = 2 << 20
CHILD = r"""
import os, random, sys
import imgchain
path, seed, kill_at, journal = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(seed)
chain = imgchain.open_chain(path, writable=True)
with open(journal, "w", buffering=1) as log:
    for i in range(10_000):
        if i == kill_at:
            os._exit(9)  # no close, no flush: like SIGKILL
        kind, off, n, byte = ops(rng)
        if kind == "flush":
            chain.flush()
            log.write(f"{i}\n")
        elif kind == "zero":
            chain.write_zeroes(off, n)
        else:
            chain.write(off, bytes([byte]) * n)
"""
OPS = r"""
def ops(rng):
    kind = rng.choice(["write"] * 6 + ["zero"] * 2 + ["flush"])
    off = rng.randrange(0, %d - 1)
    n = min(rng.randrange(1, 200_000), %d - off)
    return kind, off, n, rng.randrange(1, 256)
""" % (SIZE, SIZE)
namespace: dict = {}
exec(OPS, namespace)
ops = namespace["ops"]


def replay(seed: int, base: bytes, until: int) -> tuple[bytearray, bytearray]:
    """(content after the last flush before `until`, mask of bytes written since)."""
    rng = random.Random(seed)
    model, flushed, touched = bytearray(base), bytearray(base), bytearray(SIZE)
    for i in range(until):
        kind, off, n, byte = ops(rng)
        if kind == "flush":
            flushed, touched = bytearray(model), bytearray(SIZE)
        else:
            model[off:off + n] = bytes(n) if kind == "zero" else bytes([byte]) * n
            touched[off:off + n] = b"\x01" * n
    return flushed, touched


@pytest.mark.parametrize("seed", range(12))
def test_kill_at_a_random_point(tmp_path: Path, seed: int) -> None:
    base = tmp_path / "base.raw"
    base_data = random.Random(1000 + seed).randbytes(SIZE)
    base.write_bytes(base_data)
    top = tmp_path / "top.qcow2"
    create_image(str(top), "qcow2", SIZE, "base.raw", "raw", [512, 4096, 65536][seed % 3])
    kill_at = random.Random(seed).randrange(5, 120)
    journal = tmp_path / "journal"
    proc = subprocess.run([sys.executable, "-c", OPS + CHILD, str(top), str(seed), str(kill_at), str(journal)],
                          capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    rc = qemu_img("check", top).returncode
    assert rc in (0, 3), qemu_img("check", top).stdout
    flushed, touched = replay(seed, base_data, kill_at)
    with imgchain.open_chain(top) as chain:
        got = chain.read(0, SIZE)
    bad = [i for i in range(0, SIZE, 4096)
           if any(t == 0 and g != f for g, f, t in zip(got[i:i + 4096], flushed[i:i + 4096], touched[i:i + 4096]))]
    assert not bad, f"flushed content lost at offsets {bad[:5]}"
    assert qemu_img("check", "-r", "leaks", top).returncode == 0
