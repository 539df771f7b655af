"""imgchain.check against real `qemu-img check` 7.2.

Every case runs both on the same bytes and compares the exit code, the JSON
report (keys, values and key order), the human report and the stderr lines.
Images come from qemu-img/qemu-io and from imgchain's own writer; the
corrupted ones are byte-mutated copies of QCOW2-SUBSET.md §6.1's base.qcow2
reproducing each row of the table in §3.4. Repairs run on two identical
copies, one repaired by qemu-img and one by imgchain, which must report the
same and leave images that qemu-img checks identically.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from imgchain import FormatError, ImgchainError, open_chain
from imgchain import check as check_module
from imgchain.check import CheckResult, check_image
from imgchain.create import create_image
from imgchain.formats import ReadOnlyImage

from .conftest import FIXTURES, REPO, qemu_img, qemu_io

MANIFEST: dict[str, dict] = json.loads((REPO / "testimages" / "manifest.json").read_text())
BITMAP_NOTE = "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix."


# -- running both tools ------------------------------------------------------------


def qemu_lines(stderr: str) -> list[str]:
    """qemu-img's stderr as lines without its "qemu-img: " prefix. (qemu prints the
    bitmap note without a newline; split it off so lines compare.)"""
    stderr = stderr.replace(BITMAP_NOTE, BITMAP_NOTE + "\n")
    return [line.removeprefix("qemu-img: ") for line in stderr.splitlines() if line]


def qemu_check(path: Path, repair: str | None = None, output: str = "json") -> tuple[int, str, list[str]]:
    """qemu-img check run in the image's directory: (rc, stdout, stderr lines)."""
    args = ["check", f"--output={output}", *(["-r", repair] if repair else []), path.name]
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, cwd=path.parent)
    return proc.returncode, proc.stdout, qemu_lines(proc.stderr)


def ours(path: Path, repair: str | None = None) -> CheckResult:
    """imgchain's check, run like qemu_check (same file name in the report)."""
    cwd = os.getcwd()
    os.chdir(path.parent)  # qemu-img reports the file name as given
    try:
        return check_image(path.name, repair)
    finally:
        os.chdir(cwd)


def assert_same_report(rc: int, stdout: str, lines: list[str], result: CheckResult, output: str) -> None:
    assert result.exit_code() == rc, (result.messages, lines)
    assert result.messages == lines
    if output == "json":
        expected = json.loads(stdout) if stdout.strip() else None
        if expected is None:
            assert result.aborted
        else:
            assert list(result.to_json().items()) == list(expected.items())
            assert json.dumps(result.to_json(), indent=4) + "\n" == stdout
    else:
        assert result.human() == stdout


def assert_same_check(path: Path) -> CheckResult:
    """A read-only check: same exit code, JSON, human text and messages as qemu-img,
    and not one byte of the image changed."""
    before = path.read_bytes()
    result = ours(path)
    assert path.read_bytes() == before
    for output in ("json", "human"):
        assert_same_report(*qemu_check(path, output=output), result, output)
    return result


def assert_same_repair(path: Path, repair: str, tmp_path: Path) -> CheckResult:
    """Repair three identical copies: qemu-img (JSON), qemu-img (human), imgchain."""
    copies = {}
    for name in ("q_json", "q_human", "ours"):
        copies[name] = tmp_path / name / path.name
        copies[name].parent.mkdir(exist_ok=True)
        shutil.copy(path, copies[name])
    q_json = qemu_check(copies["q_json"], repair)
    q_human = qemu_check(copies["q_human"], repair, output="human")
    result = ours(copies["ours"], repair)
    assert_same_report(*q_json, result, "json")
    assert result.human() == q_human[1]
    after_qemu, after_ours = qemu_check(copies["q_json"]), qemu_check(copies["ours"])
    assert after_ours == after_qemu, "qemu-img judges the two repaired images differently"
    theirs, mine = copies["q_json"].read_bytes(), copies["ours"].read_bytes()
    for field in (slice(48, 60), slice(72, 80)):  # refcount table position, incompatible bits
        assert mine[field] == theirs[field]
    return result


# -- images ------------------------------------------------------------------------


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def u64(value: int) -> bytes:
    return struct.pack(">Q", value)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """QCOW2-SUBSET.md §6.1 base.qcow2: clusters 0 header, 1 reftable, 2 refblock,
    3 L1, 4 L2, 5-6 data, 7 free, 8-9 data."""
    path = tmp_path_factory.mktemp("base") / "base.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=65536", path, "64M", check=True)
    proc = qemu_io(path, "write -P 0xaa 0 64k", "write -P 0xbb 1M 128k", "write -P 0xcc 2M 64k",
                   "write -P 0xdd 33M 64k", "discard 1088k 64k")
    assert proc.returncode == 0, proc.stderr
    return path


REFTABLE, L1, L2 = 0x10000, 0x30000, 0x40000


def set_refcount(path: Path, cluster: int, value: int) -> None:
    """Patch one refcount of any width (refcount_order 0..6) in place."""
    data = path.read_bytes()
    order = struct.unpack_from(">I", data, 96)[0]
    bits, cs = 1 << order, 1 << struct.unpack_from(">I", data, 20)[0]
    per_block = cs * 8 // bits
    reftable = struct.unpack_from(">Q", data, 48)[0]
    block = struct.unpack_from(">Q", data, reftable + 8 * (cluster // per_block))[0] & ~0x1FF
    bit = (cluster % per_block) * bits
    if bits >= 8:
        patch(path, block + bit // 8, value.to_bytes(bits // 8, "big"))
    else:
        byte = data[block + bit // 8]
        mask = ((1 << bits) - 1) << (bit % 8)
        patch(path, block + bit // 8, bytes([byte & ~mask | value << (bit % 8)]))


def refblock_count(path: Path) -> int:
    data = path.read_bytes()
    offset, clusters = struct.unpack_from(">QI", data, 48)
    entries = clusters << struct.unpack_from(">I", data, 20)[0] >> 3
    return sum(1 for block in struct.unpack_from(f">{entries}Q", data, offset) if block)


MUTATIONS: dict[str, Callable[[Path], None]] = {
    "leak": lambda p: set_refcount(p, 7, 1),
    "refcount-zero": lambda p: set_refcount(p, 5, 0),
    "refcount-too-high": lambda p: set_refcount(p, 5, 2),
    "refcount-too-low": lambda p: patch(p, L2 + 8, u64(0x8000000000050000)),  # 2 refs, refcount 1
    "l2-without-copied": lambda p: patch(p, L2, u64(0x50000)),
    "l1-without-copied": lambda p: patch(p, L1, u64(0x40000)),
    "zero-alloc-without-copied": lambda p: patch(p, L2, u64(0x50001)),
    "zero-alloc-with-copied": lambda p: patch(p, L2, u64(0x8000000000050001)),
    "l2-past-eof": lambda p: patch(p, L1, u64(0x80000000000F0000)),
    "unaligned-data": lambda p: patch(p, L2, u64(0x8000000000050200)),
    "unaligned-prealloc": lambda p: patch(p, L2, u64(0x8000000000050201)),
    "l2-reserved-bit1": lambda p: patch(p, L2, u64(0x8000000000050002)),
    "l2-reserved-bit56": lambda p: patch(p, L2, u64(0x8100000000050000)),
    "l1-reserved-bit0": lambda p: patch(p, L1, u64(0x8000000000040001)),
    "l1-unaligned": lambda p: patch(p, L1, u64(0x8000000000040200)),
    "reftable-reserved-bit0": lambda p: patch(p, REFTABLE, u64(0x20001)),
    "reftable-unaligned": lambda p: patch(p, REFTABLE, u64(0x20200)),
    "refblock-outside-image": lambda p: patch(p, REFTABLE + 8, u64(0x1000000)),
    "refblock-referenced-twice": lambda p: patch(p, L2 + 8, u64(0x8000000000020000)),
    "header-refcount-zero": lambda p: set_refcount(p, 0, 0),
    "reftable-refcount-zero": lambda p: set_refcount(p, 1, 0),
    "refblock-refcount-zero": lambda p: set_refcount(p, 2, 0),
    "refcount-past-eof": lambda p: set_refcount(p, 20, 1),  # not detected by qemu either
    "dirty-with-leak": lambda p: (set_refcount(p, 7, 1), patch(p, 72, u64(1))),
    "corrupt-bit": lambda p: patch(p, 72, u64(2)),
    "many": lambda p: (set_refcount(p, 7, 1), set_refcount(p, 6, 3), patch(p, L2 + 8 * 32, u64(0x80000)),
                       patch(p, L2 + 8, u64(0x8000000000050002))),
}
# The rc qemu-img gives for each mutation (QCOW2-SUBSET.md §3.4), so a change in
# behaviour of either tool shows up as such, not only as a mismatch.
EXPECTED_RC = {"leak": 3, "zero-alloc-with-copied": 0, "refcount-past-eof": 0, "dirty-with-leak": 3,
               "corrupt-bit": 0, "reftable-unaligned": 1}
CLEANED_BY_REPAIR_ALL = {
    "leak", "refcount-zero", "refcount-too-high", "refcount-too-low", "l2-without-copied",
    "l1-without-copied", "zero-alloc-without-copied", "unaligned-prealloc", "header-refcount-zero",
    "reftable-refcount-zero", "refblock-refcount-zero", "dirty-with-leak", "corrupt-bit",
    "refblock-outside-image"}


@pytest.fixture
def mutated(request: pytest.FixtureRequest, base: Path, tmp_path: Path) -> Path:
    path = tmp_path / "img.qcow2"
    shutil.copy(base, path)
    MUTATIONS[request.param](path)
    return path


@pytest.mark.parametrize("mutated", sorted(MUTATIONS), indirect=True)
def test_mutation_check(mutated: Path, request: pytest.FixtureRequest) -> None:
    result = assert_same_check(mutated)
    name = request.node.callspec.params["mutated"]
    assert result.exit_code() == EXPECTED_RC.get(name, 2)


@pytest.mark.parametrize("repair", ["leaks", "all"])
@pytest.mark.parametrize("mutated", sorted(MUTATIONS), indirect=True)
def test_mutation_repair(mutated: Path, repair: str, tmp_path: Path,
                         request: pytest.FixtureRequest) -> None:
    assert_same_repair(mutated, repair, tmp_path)
    name = request.node.callspec.params["mutated"]
    if repair == "all" and name in CLEANED_BY_REPAIR_ALL:
        assert qemu_check(tmp_path / "ours" / mutated.name)[0] == 0


def test_repair_all_rebuilds_refcounts_like_qemu(base: Path, tmp_path: Path) -> None:
    """A refcount of 0 for a used cluster needs qemu's refcount rebuild."""
    path = tmp_path / "img.qcow2"
    shutil.copy(base, path)
    set_refcount(path, 5, 0)
    result = assert_same_repair(path, "all", tmp_path)
    assert "Rebuilding refcount structure" in result.messages
    assert (result.corruptions_fixed, result.exit_code()) == (1, 0)
    repaired = (tmp_path / "ours" / "img.qcow2").read_bytes()
    assert struct.unpack_from(">QI", repaired, 48) == (0xA0000, 1)  # the same place qemu chose


def test_repair_clears_dirty_and_corrupt_bits(base: Path, tmp_path: Path) -> None:
    path = tmp_path / "img.qcow2"
    shutil.copy(base, path)
    set_refcount(path, 7, 1)
    patch(path, 72, u64(3))
    result = ours(path, "leaks")
    assert (result.leaks_fixed, result.exit_code()) == (1, 0)
    assert struct.unpack_from(">Q", path.read_bytes(), 72)[0] == 0


def test_leaks_only_repair_cannot_rebuild(base: Path, tmp_path: Path) -> None:
    path = tmp_path / "img.qcow2"
    shutil.copy(base, path)
    set_refcount(path, 5, 0)
    result = assert_same_repair(path, "leaks", tmp_path)
    assert result.aborted and result.exit_code() == 1 and result.human() == ""
    assert result.messages[-1] == "Check failed: Input/output error"


def test_lazy_refcounts_crash(tmp_path: Path) -> None:
    """qemu-io killed with lazy refcounts on: dirty bit set, refcounts never written."""
    path = tmp_path / "lazy.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "4M", check=True)
    qemu_io(path, "write -P 1 0 128k", "write -P 2 1M 64k", "sigraise 9")
    assert struct.unpack_from(">Q", path.read_bytes(), 72)[0] & 1  # dirty
    assert assert_same_check(path).exit_code() == 2
    result = assert_same_repair(path, "all", tmp_path)
    assert "Rebuilding refcount structure" in result.messages and result.exit_code() == 0
    assert struct.unpack_from(">Q", (tmp_path / "ours" / path.name).read_bytes(), 72)[0] == 0


# -- a large sparse image: 1 TiB virtual, written at random by qemu-io ------------------


def head(path: Path) -> bytes:
    """The header of a qcow2 v3 image, without reading the (large) rest."""
    with open(path, "rb") as f:
        return f.read(104)


def refcount_entries(path: Path) -> list[int]:
    """The (16-bit) refcounts of every cluster the file holds, read from its refcount blocks."""
    header = head(path)
    cs = 1 << struct.unpack_from(">I", header, 20)[0]
    table_offset, table_clusters = struct.unpack_from(">QI", header, 48)
    with open(path, "rb") as f:
        clusters, per_block = -(-path.stat().st_size // cs), cs // 2
        f.seek(table_offset)
        table = struct.unpack(f">{table_clusters * cs // 8}Q", f.read(table_clusters * cs))
        counts: list[int] = []
        for block in table[:-(-clusters // per_block)]:
            f.seek(block & ~0x1FF)
            counts += struct.unpack(f">{per_block}H", f.read(cs)) if block else [0] * per_block
    return counts[:clusters]


@pytest.fixture(scope="module", params=[65536, 4096])
def sparse_tib(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A 1 TiB image with 1500 random 4 KiB writes (most in clusters and L2 tables of
    their own), then 12 of the clusters written discarded, freeing them inside the file.
    With 4 KiB clusters the L1 table has 512 Ki entries and the refcounts take several
    refcount blocks."""
    path = tmp_path_factory.mktemp("tib") / "tib.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={request.param}", path, "1T", check=True)
    rng = random.Random(11)
    offsets = [rng.randrange(1 << 40 >> 16) << 16 for _ in range(1500)]
    script = "".join(f"write -P {i % 250 + 1} {offset + 4096 * (i % 16)} 4k\n" for i, offset in enumerate(offsets))
    script += "".join(f"discard {offset} 64k\n" for offset in offsets[1480:1492])
    proc = subprocess.run(["qemu-io", "-t", "unsafe", "-f", "qcow2", str(path)], input=script,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout[-500:] + proc.stderr
    return path


def test_large_sparse_image(sparse_tib: Path) -> None:
    result = assert_same_check(sparse_tib)
    bits = struct.unpack_from(">I", head(sparse_tib), 20)[0]
    assert (result.exit_code(), result.total_clusters, result.allocated_clusters) == (0, 1 << 40 >> bits, 1488)


def test_large_sparse_image_with_leaks(sparse_tib: Path, tmp_path: Path) -> None:
    """The clusters the discards freed get a refcount of 1 again: leaks qemu-img reports
    and repairs cluster by cluster, far apart in the file."""
    path = tmp_path / sparse_tib.name
    shutil.copy(sparse_tib, path)
    free = [cluster for cluster, count in enumerate(refcount_entries(path)) if count == 0]
    assert len(free) == 12
    for cluster in free:
        set_refcount(path, cluster, 1)
    result = assert_same_check(path)
    assert (result.exit_code(), result.leaks) == (3, 12)
    assert assert_same_repair(path, "leaks", tmp_path).leaks_fixed == 12


@pytest.mark.parametrize("kept", [check_module.KEPT_L2_ENTRIES, 100])
def test_large_sparse_image_with_corruptions(sparse_tib: Path, tmp_path: Path, kept: int,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A data cluster with refcount 0 (needs a rebuild), one with refcount 2 (a leak
    and an OFLAG_COPIED error), and an L2 entry with a reserved bit set. With `kept`
    at 100, the OFLAG_COPIED pass reads the L2 tables again instead of reusing them."""
    monkeypatch.setattr(check_module, "KEPT_L2_ENTRIES", kept)
    path = tmp_path / sparse_tib.name
    shutil.copy(sparse_tib, path)
    bits, l1_offset = struct.unpack_from(">I16xQ", head(path), 20)
    data = json.loads(qemu_img("map", "--output=json", path, check=True).stdout)
    hosts = [extent["offset"] for extent in data if extent["data"]]
    set_refcount(path, hosts[10] >> bits, 0)
    set_refcount(path, hosts[500] >> bits, 2)
    guest = next(extent["start"] for extent in data if extent["data"] and extent["offset"] == hosts[900])
    with open(path, "rb") as f:
        f.seek(l1_offset + 8 * (guest >> bits >> (bits - 3)))
        l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
    patch(path, l2_offset + 8 * (guest >> bits & (1 << bits - 3) - 1), u64(0x8000000000000002 | hosts[900]))
    result = assert_same_check(path)
    assert (result.exit_code(), result.corruptions, result.leaks) == (2, 4, 1)


# -- images from qemu-img and from imgchain's writer -------------------------------------


def test_qemu_overlay_and_chain(base: Path, tmp_path: Path) -> None:
    shutil.copy(base, tmp_path / "base.qcow2")
    top = tmp_path / "overlay.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, check=True)
    qemu_io(top, "write -P 0x11 64k 64k", "write -z 1M 64k", "discard 2M 64k", "write -P 0x22 3M 4k",
            "write -P 0x33 4M 128k", "write -z 4M 64k", "write -z -u 4160k 64k", "write -z 33M 64k")
    assert assert_same_check(top).to_json()["allocated-clusters"] == 3


def test_missing_backing_file_raises(tmp_path: Path) -> None:
    qemu_img("create", "-f", "qcow2", tmp_path / "b.qcow2", "1M", check=True)
    qemu_img("create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", tmp_path / "t.qcow2", check=True)
    (tmp_path / "b.qcow2").unlink()
    assert qemu_check(tmp_path / "t.qcow2")[0] == 1
    with pytest.raises((ImgchainError, FormatError)):
        check_image(str(tmp_path / "t.qcow2"))


def test_raw_is_not_checked(tmp_path: Path) -> None:
    path = tmp_path / "r.raw"
    create_image(str(path), "raw", 1 << 20)
    result = ours(path)
    rc, stdout, lines = qemu_check(path)
    assert (result.exit_code(), result.format, result.messages) == (rc, "raw", lines) == (
        63, "raw", ["This image format does not support checks"])
    assert stdout == result.human() == ""


def test_our_writer_64k(tmp_path: Path) -> None:
    path = tmp_path / "w.qcow2"
    create_image(str(path), size=64 << 20)
    with open_chain(path, writable=True) as chain:
        for i in range(40):
            chain.write(i * 1_500_000 % (60 << 20), bytes([i + 1]) * 100_000)
        chain.write_zeroes(8 << 20, 3 << 20)
        chain.write_zeroes(0, 4096)
    assert assert_same_check(path).exit_code() == 0


def test_our_writer_512_byte_clusters_many_refblocks(tmp_path: Path) -> None:
    path = tmp_path / "s.qcow2"
    create_image(str(path), size=4 << 20, cluster_size=512)
    rng = random.Random(7)
    with open_chain(path, writable=True) as chain:
        chain.active.driver.ordered = False  # no fsync between steps: only speed differs
        for _ in range(1500):
            chain.write(rng.randrange(8192) * 512, bytes([rng.randrange(1, 256)]) * 512)
        for _ in range(100):
            chain.write_zeroes(rng.randrange(8192) * 512, 512)
    assert refblock_count(path) >= 5
    assert assert_same_check(path).exit_code() == 0
    set_refcount(path, path.stat().st_size // 512 - 1, 2)  # a leak on the last cluster
    assert_same_repair(path, "leaks", tmp_path)


def test_qemu_512_byte_clusters(tmp_path: Path) -> None:
    path = tmp_path / "q512.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", path, "2M", check=True)
    qemu_io(path, *(f"write -P {i % 250 + 1} {(i * 37 % 4096) * 512} 512" for i in range(800)))
    assert refblock_count(path) >= 3
    assert_same_check(path)
    set_refcount(path, 700, 3)  # a data cluster's refcount too high: leak + OFLAG_COPIED error
    assert_same_check(path)
    assert_same_repair(path, "all", tmp_path)


def test_compressed(tmp_path: Path) -> None:
    raw = tmp_path / "c.raw"
    raw.write_bytes(b"".join(bytes([i]) * 40000 + random.Random(i).randbytes(25536) for i in range(12)))
    path = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, path, check=True)
    assert assert_same_check(path).compressed_clusters > 0
    l2 = struct.unpack_from(">Q", path.read_bytes(), struct.unpack_from(">Q", path.read_bytes(), 40)[0])[0]
    first = struct.unpack_from(">Q", path.read_bytes(), l2 & 0x00FFFFFFFFFFFE00)[0]
    assert first >> 62 == 1
    patch(path, l2 & 0x00FFFFFFFFFFFE00, u64(first | 1 << 63))  # compressed with COPIED
    assert assert_same_check(path).exit_code() == 2
    assert_same_repair(path, "all", tmp_path)


def test_internal_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "snap.qcow2"
    qemu_img("create", "-f", "qcow2", path, "4M", check=True)
    qemu_io(path, "write -P 1 0 192k", "write -P 2 1M 64k")
    qemu_img("snapshot", "-c", "first", path, check=True)
    qemu_io(path, "write -P 3 64k 64k", "write -z 1M 64k")
    qemu_img("snapshot", "-c", "second", path, check=True)
    qemu_io(path, "write -P 4 2M 64k")
    assert assert_same_check(path).exit_code() == 0
    set_refcount(path, 4, 1)  # an L2 table the snapshots share: refcount too low
    assert_same_check(path)
    assert_same_repair(path, "all", tmp_path)


def test_bitmaps(tmp_path: Path) -> None:
    path = tmp_path / "bm.qcow2"
    qemu_img("create", "-f", "qcow2", path, "4M", check=True)
    qemu_img("bitmap", "--add", path, "bm0", check=True)
    qemu_io(path, "write -P 1 0 1M")
    qemu_img("bitmap", "--add", "-g", "512", path, "bm1", check=True)
    assert assert_same_check(path).exit_code() == 0
    patch(path, 88, u64(0))  # a writer without bitmap support cleared autoclear bit 0
    assert assert_same_check(path).exit_code() == 3
    assert_same_repair(path, "leaks", tmp_path)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_widths(bits: int, tmp_path: Path) -> None:
    path = tmp_path / "w.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"refcount_bits={bits},cluster_size=4096", path, "4M",
             check=True)
    qemu_io(path, *(f"write -P {i + 1} {i * 100}k 8k" for i in range(30)))
    assert assert_same_check(path).exit_code() == 0
    set_refcount(path, path.stat().st_size // 4096 + 2, 1)  # past EOF: not counted
    set_refcount(path, 2, 0 if bits == 1 else 3)
    assert_same_check(path)
    if bits != 16:
        with pytest.raises(ReadOnlyImage, match="16-bit"):
            check_image(str(path), "leaks")


# -- the fixtures of testimages/ -------------------------------------------------------


REFUSED_FIXTURES = {"v2.qcow2", "luks.qcow2", "extl2.qcow2", "datafile.qcow2", "zstd.qcow2"}


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_fixture(name: str) -> None:
    """Read-only checks of the fixtures themselves (assert_same_check verifies no byte changes);
    fixtures outside the subset are refused with a FormatError naming the file."""
    if name in REFUSED_FIXTURES:
        with pytest.raises(FormatError, match=name):
            check_image(str(FIXTURES / name))
        return
    result = assert_same_check(FIXTURES / name)
    assert result.exit_code() == MANIFEST[name].get("qemu_check_rc", result.exit_code())
