"""Chains of any depth: a 2000-layer chain opens, reads, maps, checks, mounts,
streams and commits, and the open-file limit is reported in one line.

Every walk down a chain is a loop, never a recursion: 2000 layers is twice
Python's default recursion limit, so any recursive walk left on these paths
fails here. The chain is built once for the module with imgchain's own
create API (whole-cluster writes and zero clusters in every third layer, a
sparse raw base), and a model of its content is kept alongside. qemu-img
needs about 30 s for one command on this chain (its opening is quadratic in
the depth), so it runs once: for `map`, byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import imgchain
from imgchain.chain import open_image
from imgchain.create import create_qcow2, create_raw
from imgchain.map import map_json

from .conftest import qemu_img
from .mounting import IMGCHAIN, cli, mount

DEPTH = 2000
CLUSTER = 4096
SIZE = 1 << 20
CLUSTERS = SIZE // CLUSTER


@dataclass
class DeepChain:
    folder: Path
    model: bytes  # the guest content
    depth: int = DEPTH

    @property
    def top(self) -> Path:
        return self.folder / _name(self.depth - 1)

    def clone(self, dst: Path) -> "DeepChain":
        """A copy of the chain's folder (holes kept), for a test that changes it."""
        dst.mkdir()
        for f in self.folder.iterdir():
            subprocess.run(["cp", "--sparse=always", f, dst / f.name], check=True)
        return DeepChain(dst, self.model, self.depth)

    def model_file(self) -> Path:
        path = self.folder.parent / f"{self.folder.name}-model.raw"
        if not path.exists():
            path.write_bytes(self.model)
        return path


def _name(layer: int) -> str:
    return "l0000.raw" if layer == 0 else f"l{layer:04d}.qcow2"


def build_deep_chain(folder: Path, depth: int = DEPTH) -> DeepChain:
    """l0000.raw (sparse: data in its first quarter) <- l0001.qcow2 <- ... ;
    every third layer writes one cluster, every ninth also zeroes one, all
    between the first eighth and the last quarter, so the base still
    answers at both ends."""
    folder.mkdir()
    model = bytearray(SIZE)
    create_raw(str(folder / _name(0)), SIZE)
    with open(folder / _name(0), "r+b") as f:
        f.write(b"\x01" * (SIZE // 4))
    model[:SIZE // 4] = b"\x01" * (SIZE // 4)
    with pytest.MonkeyPatch.context() as mp:  # building needs no durability: skip the syncs
        mp.setattr(os, "fsync", lambda fd: None)
        mp.setattr(os, "fdatasync", lambda fd: None)
        for layer in range(1, depth):
            below = _name(layer - 1)
            create_qcow2(str(folder / _name(layer)), SIZE, CLUSTER, below, "raw" if layer == 1 else "qcow2")
            if layer % 3 == 0:
                _write_layer(folder / _name(layer), layer, model)
    return DeepChain(folder, bytes(model), depth)


def _write_layer(path: Path, layer: int, model: bytearray) -> None:
    node = open_image(str(path), writable=True)
    try:
        at = (CLUSTERS // 8 + (layer * 37) % (CLUSTERS * 5 // 8)) * CLUSTER
        data = bytes([layer % 251 + 1]) * CLUSTER
        node.write(at, data)
        model[at:at + CLUSTER] = data
        if layer % 9 == 0:
            at = (CLUSTERS // 8 + (layer * 11) % (CLUSTERS * 5 // 8)) * CLUSTER
            node.write_zeroes(at, CLUSTER)
            model[at:at + CLUSTER] = bytes(CLUSTER)
    finally:
        node.close()


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> DeepChain:
    return build_deep_chain(tmp_path_factory.mktemp("depth") / "chain")


def run_in(folder: Path, *argv: str, preexec: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), cwd=folder, capture_output=True, text=True, preexec_fn=preexec, timeout=600)


# ---------------------------------------------------------------------------
# Offline


def test_deep_chain_reads_through_every_layer(deep: DeepChain) -> None:
    with imgchain.open_chain(deep.top) as chain:
        assert len(chain.nodes) == DEPTH
        assert chain.read(0, SIZE) == deep.model
        rng = random.Random(1)
        for _ in range(50):
            offset = rng.randrange(SIZE)
            length = rng.randrange(1, SIZE - offset + 1)
            assert chain.read(offset, length) == deep.model[offset:offset + length]
        top = chain.active
        pieces = sorted((ext.guest_offset, ext.end) for _, ext in top.chain_status(0, SIZE))
        assert sum(end - start for start, end in pieces) == SIZE  # every byte answered by one layer
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
        assert top.reads_as_zero(SIZE - CLUSTER, CLUSTER) == (deep.model[-CLUSTER:] == bytes(CLUSTER))


def test_deep_chain_maps_as_qemu_img_does(deep: DeepChain) -> None:
    theirs = run_in(deep.folder, "qemu-img", "map", "--output=json", deep.top.name)
    assert theirs.returncode == 0, theirs.stderr
    ours = run_in(deep.folder, IMGCHAIN, "map", "--output", "json", deep.top.name)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == theirs.stdout
    depths = {e["depth"] for e in json.loads(ours.stdout)}
    assert max(depths) == DEPTH - 1 and len(depths) > 100  # answered all the way down


def test_deep_chain_checks_and_infos(deep: DeepChain) -> None:
    check = run_in(deep.folder, IMGCHAIN, "check", deep.top.name)
    assert check.returncode == 0, check.stderr
    assert "No errors were found on the image." in check.stdout
    info = run_in(deep.folder, IMGCHAIN, "info", "--backing-chain", "--output", "json", deep.top.name)
    assert info.returncode == 0, info.stderr
    records = json.loads(info.stdout)
    assert [r["filename"] for r in records] == [_name(n) for n in reversed(range(DEPTH))]
    same = run_in(deep.folder, IMGCHAIN, "compare", deep.top.name, str(deep.model_file()))
    assert (same.returncode, same.stdout) == (0, "Images are identical.\n")


def test_deep_chain_streams_and_commits_offline(deep: DeepChain, tmp_path: Path) -> None:
    streamed = deep.clone(tmp_path / "stream")
    done = run_in(streamed.folder, IMGCHAIN, "stream", "-q", streamed.top.name)
    assert done.returncode == 0, done.stderr
    assert "backing-filename" not in json.loads(qemu_img("info", "--output=json", streamed.top).stdout)
    assert imgchain.open_chain(streamed.top).read(0, SIZE) == deep.model

    committed = deep.clone(tmp_path / "commit")
    done = run_in(committed.folder, IMGCHAIN, "commit", "-q", "--base", _name(0), committed.top.name)
    assert done.returncode == 0, done.stderr
    assert (committed.folder / _name(0)).read_bytes() == deep.model


def test_deep_chain_rebases(deep: DeepChain, tmp_path: Path) -> None:
    chain = deep.clone(tmp_path / "rebase")
    done = run_in(chain.folder, IMGCHAIN, "rebase", "-b", _name(0), "-F", "raw", chain.top.name)
    assert done.returncode == 0, done.stderr
    with imgchain.open_chain(chain.top) as opened:
        assert len(opened.nodes) == 2
        assert opened.read(0, SIZE) == deep.model


# ---------------------------------------------------------------------------
# Mounted


def test_deep_chain_mounts_reads_writes_snapshots_and_streams(deep: DeepChain, tmp_path: Path) -> None:
    chain = deep.clone(tmp_path / "mounted")
    model = bytearray(deep.model)
    disk = tmp_path / "disk.img"
    with mount(chain.top, disk):
        assert disk.read_bytes() == model
        fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
        try:
            rng = random.Random(2)
            for _ in range(64):  # direct 4 KiB reads, each a walk to wherever its cluster is
                offset = rng.randrange(CLUSTERS) * CLUSTER
                assert os.preadv(fd, [buf := bytearray(CLUSTER)], offset) == CLUSTER
                assert buf == model[offset:offset + CLUSTER]
        finally:
            os.close(fd)
        with open(disk, "r+b") as f:  # copy-on-write of a cluster the raw base holds
            f.seek(SIZE - 100_000)
            f.write(b"\x77" * 5000)
            f.flush()
            os.fsync(f.fileno())
        model[SIZE - 100_000:SIZE - 95_000] = b"\x77" * 5000
        assert disk.read_bytes() == model

        snap = run_in(chain.folder, IMGCHAIN, "snapshot", chain.top.name, "snap.qcow2")  # query-block, 2001 deep
        assert snap.returncode == 0, snap.stderr
        middle = _name(DEPTH // 2)
        done = run_in(chain.folder, IMGCHAIN, "stream", "-q", "--base", middle, "snap.qcow2")
        assert done.returncode == 0, done.stderr
        assert disk.read_bytes() == model
    info = json.loads(qemu_img("info", "--output=json", chain.folder / "snap.qcow2").stdout)
    assert os.path.samefile(info["full-backing-filename"], chain.folder / middle)
    with imgchain.open_chain(chain.folder / "snap.qcow2") as opened:
        assert len(opened.nodes) == DEPTH // 2 + 2
        assert opened.read(0, SIZE) == model


# ---------------------------------------------------------------------------
# The open-file limit


def _nofile(soft: int, hard: int) -> Callable[[], None]:
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_open_file_limit_is_one_line_with_the_numbers(deep: DeepChain) -> None:
    for argv in (("map", "--output", "json"), ("check",), ("info", "--backing-chain")):
        proc = run_in(deep.folder, IMGCHAIN, *argv, deep.top.name, preexec=_nofile(256, 256))
        if argv[0] == "info":  # one image open at a time: no limit to reach
            assert proc.returncode == 0, proc.stderr
            continue
        assert proc.returncode == 1 and proc.stdout == ""
        match = re.fullmatch(rf"imgchain: error: {deep.top.name}: a chain of {DEPTH} images needs about "
                             rf"(\d+) open files; the limit is 256 \(ulimit -n\)\n", proc.stderr)
        assert match, proc.stderr
        assert DEPTH < int(match.group(1)) < DEPTH + 20


def test_soft_open_file_limit_is_raised_to_the_hard_one(deep: DeepChain) -> None:
    proc = run_in(deep.folder, IMGCHAIN, "map", "--output", "json", deep.top.name, preexec=_nofile(256, 4096))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == map_json(str(deep.top))


def test_mount_at_the_open_file_limit_fails_in_one_line(deep: DeepChain, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    proc = run_in(deep.folder, IMGCHAIN, "mount", deep.top.name, str(disk), preexec=_nofile(256, 256))
    assert proc.returncode != 0
    assert re.search(rf"a chain of {DEPTH} images needs about \d+ open files; the limit is 256", proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not disk.exists()
    leftover = [r for r in json.loads(cli("mounts", "--output", "json").stdout) if r["mountpoint"] == str(disk)]
    assert not leftover

