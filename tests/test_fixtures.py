"""imgchain against the qemu-made fixtures of testimages/ (manifest.json).

Every fixture imgchain may open reads back with the sha256 the manifest
recorded from `qemu-img convert -O raw`, and every node of its chain has the
format, size, cluster size and backing the manifest lists. The fixtures
outside the subset are refused with a FormatError naming the file; the
read-only ones are refused for writing; the writable ones take writes (on
copies in tmp_path) and stay clean for `qemu-img check`.

The fixtures themselves are opened read-only only, and a module fixture
asserts that no byte of testimages/fixtures changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest

import imgchain
from imgchain import FormatError, open_chain
from imgchain.formats import ReadOnlyImage, UnsupportedFeature

from .conftest import FIXTURES, REPO, assert_qemu_clean, qemu_img, qemu_io

MANIFEST: dict[str, dict] = json.loads((REPO / "testimages" / "manifest.json").read_text())

# Outside the subset: opening them at all must fail (reason keyword in the message).
REJECTED = {
    "v2.qcow2": "v2",
    "luks.qcow2": "encrypt",
    "extl2.qcow2": "extended L2",
    "datafile.qcow2": "data file",
    "zstd.qcow2": "compression",
}
READABLE = sorted(n for n, e in MANIFEST.items() if e["sha256"] is not None and n not in REJECTED)
READ_ONLY = {"snapshot.qcow2": "snapshot", "bitmaps.qcow2": "bitmaps"}


def _tree_digest() -> dict[str, str]:
    out = {}
    for p in sorted(FIXTURES.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(FIXTURES))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module", autouse=True)
def fixtures_untouched():
    """No test of this module may change a fixture file."""
    before = _tree_digest()
    yield
    assert _tree_digest() == before, "a test modified testimages/fixtures"


def _sha256_of_chain(chain: imgchain.Chain) -> str:
    h = hashlib.sha256()
    step = 8 << 20
    for off in range(0, chain.size, step):
        h.update(chain.read(off, min(step, chain.size - off)))
    return h.hexdigest()


def _manifest_key(node_filename: str) -> str:
    return os.path.relpath(os.path.normpath(os.path.abspath(node_filename)), FIXTURES)


def test_manifest_covers_the_fixture_tree():
    on_disk = {str(p.relative_to(FIXTURES)) for p in FIXTURES.rglob("*") if p.is_file()}
    assert on_disk == set(MANIFEST)
    assert set(REJECTED) <= on_disk and set(READ_ONLY) <= on_disk
    assert len(READABLE) >= 15


@pytest.mark.parametrize("name", READABLE)
def test_fixture_content_and_nodes(name: str):
    entry = MANIFEST[name]
    with open_chain(FIXTURES / name) as chain:
        assert chain.size == entry["virtual_size"]
        assert _sha256_of_chain(chain) == entry["sha256"]
        # a few unaligned reads agree with the whole-image read
        whole = chain.read(0, chain.size)
        rng = random.Random(name)
        for _ in range(20):
            off = rng.randrange(chain.size)
            n = rng.randrange(1, min(200_000, chain.size - off) + 1)
            assert chain.read(off, n) == whole[off:off + n]
        nodes = chain.nodes
        assert nodes[0].node_name  # named
        expected_depth = 1
        key = name
        while MANIFEST[key]["backing"]:
            key = _manifest_key(os.path.join(os.path.dirname(FIXTURES / key), MANIFEST[key]["backing"]))
            expected_depth += 1
        assert len(nodes) == expected_depth
        for i, node in enumerate(nodes):
            key = _manifest_key(node.filename)
            assert key in MANIFEST, node.filename
            if i == 0:
                assert key == name
            e = MANIFEST[key]
            assert node.format_name == e["format"], key
            assert node.size == e["virtual_size"], key
            assert node.driver.cluster_size == e["cluster_size"], key
            assert node.driver.backing_file == e["backing"], key
            if e["format"] == "qcow2":
                assert node.driver.backing_format == e["backing_format"], key
            assert node.writable is False
        for upper, lower in zip(nodes, nodes[1:]):
            assert upper.backing_node is lower
        assert nodes[-1].backing_node is None


@pytest.mark.parametrize("writable", [False, True], ids=["ro", "rw"])
@pytest.mark.parametrize("name", sorted(REJECTED))
def test_rejected_fixture(name: str, writable: bool, tmp_path: Path):
    # A writable attempt runs on a copy (datafile.qcow2 needs its data file next to it).
    if writable:
        for f in FIXTURES.iterdir():
            if f.is_file() and f.name.startswith(name.split(".")[0]):
                shutil.copy(f, tmp_path / f.name)
        target = tmp_path / name
    else:
        target = FIXTURES / name
    before = target.read_bytes()
    with pytest.raises(FormatError) as info:
        open_chain(target, writable=writable)
    err = info.value
    assert isinstance(err, UnsupportedFeature)
    msg = str(err)
    assert name in msg
    assert err.filename.endswith(name)
    assert REJECTED[name].lower() in msg.lower(), msg
    assert target.read_bytes() == before


@pytest.mark.parametrize("name", sorted(READ_ONLY))
def test_read_only_fixture_refuses_writable_open(name: str, tmp_path: Path):
    copy = tmp_path / name
    shutil.copy(FIXTURES / name, copy)
    before = copy.read_bytes()
    with pytest.raises(FormatError) as info:
        open_chain(copy, writable=True)
    err = info.value
    assert isinstance(err, ReadOnlyImage)
    assert name in str(err)
    assert READ_ONLY[name] in err.reason, err.reason  # says why
    assert copy.read_bytes() == before  # refused before touching the header
    # reading stays possible and right
    with open_chain(copy) as chain:
        assert _sha256_of_chain(chain) == MANIFEST[name]["sha256"]
    assert_qemu_clean(copy)


# -- writable fixtures (copies) ----------------------------------------------


def _write_model(path: Path, model: bytearray) -> None:
    with open(path, "wb") as f:
        f.write(model)


def _assert_matches_model(image: Path, model: bytearray, tmp_path: Path) -> None:
    with open_chain(image) as chain:
        assert chain.size == len(model)
        got = chain.read(0, chain.size)
    assert got == model
    raw = tmp_path / "model.raw"
    _write_model(raw, model)
    proc = qemu_img("compare", "-F", "raw", image, raw)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Images are identical." in proc.stdout
    assert_qemu_clean(image)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def _runs(model: bytearray, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(byte, offset, length) of the constant runs of model[lo:hi]."""
    out = []
    pos = lo
    while pos < hi:
        b = model[pos]
        end = pos + 1
        while end < hi and model[end] == b:
            end += 1
        out.append((b, pos, end - pos))
        pos = end
    return out


def _qemu_read_patterns(image: Path, patterns: list[tuple[int, int, int]]) -> None:
    cmds = [f"read -P 0x{p:02x} {off} {n}" for p, off, n in patterns]
    proc = qemu_io(image, *cmds)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Pattern verification failed" not in out
    for _, off, n in patterns:
        assert f"read {n}/{n} bytes at offset {off}" in out, out


@pytest.mark.parametrize("name", ["lazy.qcow2", "c512.qcow2", "c2m.qcow2"])
def test_writable_fixture_copy(name: str, tmp_path: Path):
    copy = tmp_path / name
    shutil.copy(FIXTURES / name, copy)
    entry = MANIFEST[name]
    cs, size = entry["cluster_size"], entry["virtual_size"]
    with open_chain(copy) as chain:
        model = bytearray(chain.read(0, chain.size))
    # (pattern, offset, length): unaligned, crossing clusters, over qemu data,
    # over zero clusters, into unallocated space, at the very end
    writes = [
        (0xA1, 7, 3 * 512 + 11),
        (0xA2, cs - 100, 200),
        (0xA3, 2 * cs + 1, cs),
        (0xA4, size // 2 + 333, 5000),
        (0xA5, size - 777, 777),
    ]
    zeroes = [(cs // 2 + 1, 1000), (size // 4, 2 * cs + 5)]
    with open_chain(copy, writable=True) as chain:
        for p, off, n in writes:
            chain.write(off, bytes([p]) * n)
            model[off:off + n] = bytes([p]) * n
        for off, n in zeroes:
            chain.write_zeroes(off, n)
            model[off:off + n] = bytes(n)
    _assert_matches_model(copy, model, tmp_path)
    # qemu-io sees every pattern the model expects in the touched ranges
    checks = []
    for lo, hi in _merge([(off, off + n) for _, off, n in writes] + [(off, off + n) for off, n in zeroes]):
        checks += _runs(model, lo, hi)
    assert {p for p, _, _ in checks} >= {0xA1, 0xA5, 0}
    assert len(checks) >= 4
    _qemu_read_patterns(copy, checks)
    # qemu can write on top and everything stays consistent
    proc = qemu_io(copy, "write -P 0xb7 12345 4321")
    assert proc.returncode == 0, proc.stderr
    model[12345:12345 + 4321] = b"\xb7" * 4321
    _assert_matches_model(copy, model, tmp_path)


def test_lazy_refcounts_fixture_writes_keep_refcounts_exact(tmp_path: Path):
    """After imgchain writes, the lazy-refcounts image needs no repair."""
    copy = tmp_path / "lazy.qcow2"
    shutil.copy(FIXTURES / "lazy.qcow2", copy)
    with open_chain(copy, writable=True) as chain:
        chain.write(3 << 20, b"\x5c" * 70_000)
    proc = qemu_img("check", "--output=json", copy)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0
    info = json.loads(qemu_img("info", "--output=json", copy, check=True).stdout)
    assert info["dirty-flag"] is False
    _qemu_read_patterns(copy, [(0x5C, 3 << 20, 70_000)])


def _compressed_clusters(path: Path) -> int:
    proc = qemu_img("check", "--output=json", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout).get("compressed-clusters", 0)


def test_compressed_fixture_partial_overwrite(tmp_path: Path):
    copy = tmp_path / "compressed.qcow2"
    shutil.copy(FIXTURES / "compressed.qcow2", copy)
    compressed_before = _compressed_clusters(copy)
    assert compressed_before >= 5
    with open_chain(copy) as chain:
        model = bytearray(chain.read(0, chain.size))
        kinds = {e.guest_offset: e.status.value for e in chain.active.driver.block_status(0, chain.size)}
    # guest clusters 0, 1, 2, 6, 14, 15 are compressed (convert -c); 4 is stored plain
    for c in (0, 1, 2, 6, 14):
        assert kinds.get(c * 65536) == "compressed", kinds
    assert kinds.get(4 * 65536) == "data"
    ops = [
        ("w", 6 * 65536 + 5000, b"\xe5" * 1000),          # inside the half-compressible cluster
        ("w", 65536 - 1234, b"\xe6" * 2468),              # across compressed clusters 0 | 1
        ("z", 2 * 65536, 65536),                          # a whole compressed cluster -> zero cluster
        ("w", 14 * 65536 + 65535, b"\xe7" * 2),           # last byte of 14, first of 15
        ("z", 4 * 65536 + 100, 300),                      # the plain cluster, partial zero
    ]
    with open_chain(copy, writable=True) as chain:
        for kind, off, arg in ops:
            if kind == "w":
                chain.write(off, arg)
                model[off:off + len(arg)] = arg
            else:
                chain.write_zeroes(off, arg)
                model[off:off + arg] = bytes(arg)
    _assert_matches_model(copy, model, tmp_path)
    # the untouched compressed cluster stays compressed; rewritten ones are not
    with open_chain(copy) as chain:
        kinds = {e.guest_offset: e.status.value for e in chain.active.driver.block_status(0, chain.size)}
    assert kinds.get(0) == "data" and kinds.get(6 * 65536) == "data"
    assert _compressed_clusters(copy) < compressed_before
    _qemu_read_patterns(copy, [(0xE5, 6 * 65536 + 5000, 1000), (0xE6, 65536 - 1234, 2468),
                               (0, 2 * 65536, 65536), (0xE7, 14 * 65536 + 65535, 2)])
    # qemu overwrites another compressed cluster of the modified image: still clean
    proc = qemu_io(copy, "write -P 0xe8 960k 3000")
    assert proc.returncode == 0, proc.stderr
    model[960 * 1024:960 * 1024 + 3000] = b"\xe8" * 3000
    _assert_matches_model(copy, model, tmp_path)
