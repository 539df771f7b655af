"""imgchain and real qemu-io / qemu-img writing the same images, both ways.

Every scenario keeps a bytearray model of the guest-visible content and checks
it from both sides after every step: imgchain's `Chain.read`, qemu-io
`read -P` over every constant run of the model (the operations only write
byte patterns and zeros, so the model is a list of runs), `qemu-img compare`
against a raw file of the model, and `qemu-img check` ("No errors were
found") on every qcow2 image of the chain.

- imgchain-made images (create_image; no backing, over raw, over qcow2;
  cluster sizes 512 B .. 2 MiB) get qemu-io writes, zero writes and discards,
  imgchain reads them back, then imgchain writes more and qemu verifies.
- qemu-img-made images and chains get imgchain writes (COW of partial
  clusters from one or two backing layers, zero clusters hiding backing data).
- Many scattered writes in a 512-byte-cluster image: many refcount blocks and
  a refcount table growth; qemu-io then writes into the result.
- Write / zero / rewrite loops: freed clusters are reused, the file stays small.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from imgchain import open_chain
from imgchain.create import create_image
from imgchain.formats.qcow2_tables import ClusterType, classify_l2

from .conftest import assert_qemu_clean, qemu_img, qemu_io

KiB, MiB = 1024, 1024 * 1024
CLUSTER_SIZES = [512, 4096, 65536, 2 * MiB]

# An op is (kind, offset, length, pattern): kind "P" write a byte pattern,
# "Z" write zeroes (qemu-io `write -z`), "ZU" (`write -z -u`), "D" (`discard`,
# cluster-aligned only: qemu leaves partial clusters of a discard untouched).
Op = tuple[str, int, int, int]


def P(pattern: int, off: int, n: int) -> Op:
    return ("P", off, n, pattern)


def Z(off: int, n: int) -> Op:
    return ("Z", off, n, 0)


def ZU(off: int, n: int) -> Op:
    return ("ZU", off, n, 0)


def D(off: int, n: int) -> Op:
    return ("D", off, n, 0)


def _apply_model(model: bytearray, op: Op) -> None:
    kind, off, n, pattern = op
    model[off:off + n] = bytes([pattern if kind == "P" else 0]) * n


# -- both tools --------------------------------------------------------------


def qemu_apply(image: Path, ops: list[Op], model: bytearray, fmt: str | None = None) -> None:
    """Run the ops with one qemu-io process; each must report completion."""
    cmds, expect = [], []
    for kind, off, n, pattern in ops:
        if kind == "P":
            cmds.append(f"write -P 0x{pattern:02x} {off} {n}")
        elif kind == "Z":
            cmds.append(f"write -z {off} {n}")
        elif kind == "ZU":
            cmds.append(f"write -z -u {off} {n}")
        elif kind == "D":
            cmds.append(f"discard {off} {n}")
        else:
            raise AssertionError(kind)
        verb = "discard" if kind == "D" else "wrote"
        expect.append(f"{verb} {n}/{n} bytes at offset {off}")
    proc = qemu_io(image, *cmds, fmt=fmt)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{cmds}\n{out}"
    for line in expect:
        assert line in out, f"missing {line!r} in\n{out}"
    for op in ops:
        _apply_model(model, op)


def imgchain_apply(image: Path, ops: list[Op], model: bytearray) -> None:
    """Run the ops through a writable imgchain Chain (zero kinds are write_zeroes)."""
    with open_chain(image, writable=True) as chain:
        assert chain.size == len(model)
        for kind, off, n, pattern in ops:
            if kind == "P":
                chain.write(off, bytes([pattern]) * n)
            else:
                chain.write_zeroes(off, n)
            _apply_model(model, (kind, off, n, pattern))


def _runs(model: bytearray, lo: int = 0, hi: int | None = None) -> list[tuple[int, int, int]]:
    """(byte, offset, length) of the constant runs of model[lo:hi]."""
    hi = len(model) if hi is None else hi
    out = []
    pos = lo
    step = 4096
    while pos < hi:
        b = model[pos]
        chunk = bytes([b]) * step
        end = pos + 1
        while end < hi and model[end] == b and end % step:
            end += 1
        while end + step <= hi and model[end:end + step] == chunk:
            end += step
        while end < hi and model[end] == b:
            end += 1
        out.append((b, pos, end - pos))
        pos = end
    return out


def qemu_verify(image: Path, model: bytearray) -> int:
    """qemu-io `read -P` of every constant run: all must match. Returns the run count."""
    runs = _runs(model)
    assert len(runs) < 2000, "qemu_verify is for pattern models"
    for i in range(0, len(runs), 400):
        batch = runs[i:i + 400]
        proc = qemu_io(image, *[f"read -P 0x{b:02x} {off} {n}" for b, off, n in batch])
        out = proc.stdout + proc.stderr
        assert "Pattern verification failed" not in out, out
        assert proc.returncode == 0, out
        for _, off, n in batch:
            assert f"read {n}/{n} bytes at offset {off}\n" in out, out
    return len(runs)


def qemu_compare(image: Path, model: bytearray, tmp_path: Path) -> None:
    raw = tmp_path / "model.raw"
    with open(raw, "wb") as f:
        f.write(model)
    try:
        proc = qemu_img("compare", "-F", "raw", image, raw)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Images are identical." in proc.stdout
    finally:
        raw.unlink()


def imgchain_verify(image: Path, model: bytearray, seed: int = 0) -> None:
    with open_chain(image) as chain:
        assert chain.size == len(model)
        whole = chain.read(0, chain.size)
        assert whole == model, _first_difference(whole, model)
        rng = random.Random(seed)
        for _ in range(10):  # unaligned partial reads
            off = rng.randrange(len(model))
            n = rng.randrange(1, min(300_000, len(model) - off) + 1)
            assert chain.read(off, n) == model[off:off + n]


def _first_difference(a: bytes, b: bytes) -> str:
    for i in range(0, min(len(a), len(b)), 4096):
        if a[i:i + 4096] != b[i:i + 4096]:
            j = next(k for k in range(i, i + 4096) if a[k] != b[k])
            return f"first difference at {j:#x}: got {a[j]:#04x}, want {b[j]:#04x}"
    return f"lengths {len(a)} / {len(b)}"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _header_fields(path: Path) -> dict[str, int]:
    with open(path, "rb") as f:
        h = f.read(104)
    u32 = lambda o: int.from_bytes(h[o:o + 4], "big")  # noqa: E731
    u64 = lambda o: int.from_bytes(h[o:o + 8], "big")  # noqa: E731
    return dict(cluster_bits=u32(20), size=u64(24), l1_size=u32(36), l1_table_offset=u64(40),
                refcount_table_offset=u64(48), refcount_table_clusters=u32(56))


def _reftable_blocks(path: Path) -> int:
    """Number of non-zero refcount table entries (refcount blocks)."""
    h = _header_fields(path)
    cs = 1 << h["cluster_bits"]
    with open(path, "rb") as f:
        f.seek(h["refcount_table_offset"])
        raw = f.read(h["refcount_table_clusters"] * cs)
    return sum(1 for i in range(0, len(raw), 8) if int.from_bytes(raw[i:i + 8], "big"))


# -- the scenario shared by both directions ----------------------------------


def _kinds(image: Path, cs: int, count: int = 16) -> list[ClusterType]:
    """The L2 entry types of the first guest clusters of the active image."""
    with open_chain(image) as chain:
        return [classify_l2(chain.active.driver.l2_entry(i * cs)) for i in range(count)]


def _size_for(cs: int) -> int:
    return max(1 * MiB, 18 * cs)


def base_ops(cs: int, size: int) -> list[Op]:
    """Backing content under the places the overlay ops touch."""
    return [P(0xB0, 0, 3 * cs + cs // 2), P(0xB1, 7 * cs - 50, 2 * cs + 127),
            P(0xB2, 10 * cs, 5 * cs), P(0xB3, size - 5000, 5000)]


def qemu_ops(cs: int, size: int) -> list[Op]:
    return [
        P(0x41, cs // 2 + 7, 2 * cs + 100),   # unaligned, three clusters, COW from below
        P(0x42, 3 * cs - 300, 600),           # across a cluster boundary
        Z(3 * cs, cs),                        # allocated -> ZERO_ALLOC (imgchain zeroes it later)
        Z(cs + 123, cs // 3),                 # partial zero inside qemu's data
        P(0x43, 4 * cs, 3 * cs),              # whole clusters 4..6
        Z(4 * cs, cs),                        # allocated -> ZERO_ALLOC
        ZU(5 * cs, cs),                       # allocated -> ZERO_PLAIN, cluster freed
        D(6 * cs, cs),                        # discard -> ZERO_PLAIN, cluster freed
        Z(8 * cs + 5, cs),                    # unaligned zero over backing data
        ZU(10 * cs, 2 * cs),                  # zero clusters hiding backing data
        D(12 * cs, cs),                       # discard of an unallocated cluster over backing
        P(0x45, 13 * cs + 1, 1),              # one byte
        P(0x44, size - 1000, 1000),           # the last bytes of the image
    ]


def imgchain_ops(cs: int, size: int) -> list[Op]:
    return [
        P(0x61, cs - 11, cs + 22),            # in place over qemu's clusters, crossing
        P(0x62, 4 * cs + 100, 200),           # partial write into qemu's ZERO_ALLOC
        P(0x63, 5 * cs + cs // 2, cs),        # ZERO_PLAIN (write -z -u) -> discarded cluster
        P(0x64, 7 * cs + 1, cs // 2),         # unallocated over backing: COW head and tail
        Z(8 * cs + 3, 3 * cs),                # partial, whole (backing, ZERO_PLAIN), partial
        P(0x65, 13 * cs - 5, 10),             # unallocated | qemu's one-byte cluster
        Z(2 * cs, cs),                        # qemu data cluster -> zero cluster (freed)
        Z(3 * cs, cs),                        # qemu's ZERO_ALLOC -> ZERO_PLAIN (freed)
        Z(14 * cs, cs),                       # zero cluster hiding backing data
        P(0x66, 15 * cs - 7, 2 * cs),         # partial over backing, then past its patterns
        P(0x67, size - 3 * cs // 2 - 3, cs),  # near the end
        Z(size - 700, 700),                   # the very end, partial cluster
    ]


def final_qemu_ops(cs: int, size: int) -> list[Op]:
    """qemu-io again, on tables imgchain wrote."""
    return [P(0x71, 5 * cs + 3, cs), D(0, cs), P(0x72, 9 * cs - 9, 20), Z(15 * cs, cs),
            P(0x73, 16 * cs - 1, 2)]


def _make_qcow2(creator: str, path: Path, size: int | None, cs: int,
                backing: Path | None = None, backing_fmt: str | None = None) -> None:
    if creator == "imgchain":
        create_image(str(path), "qcow2", size, backing.name if backing else None, backing_fmt, cs)
    else:
        args = ["create", "-f", "qcow2", "-o", f"cluster_size={cs}"]
        if backing:
            args += ["-b", backing.name, "-F", backing_fmt]
        qemu_img(*args, path, *([str(size)] if size else []), check=True)


def _make_raw(creator: str, path: Path, size: int) -> None:
    if creator == "imgchain":
        create_image(str(path), "raw", size)
    else:
        qemu_img("create", "-f", "raw", path, str(size), check=True)


def _build_chain(tmp_path: Path, creator: str, cs: int, backing: str) -> tuple[Path, list[Path], bytearray]:
    """(top, all images, model) with the backing content written by qemu-io."""
    size = _size_for(cs)
    model = bytearray(size)
    images: list[Path] = []
    base = None
    if backing == "raw":
        base = tmp_path / "base.raw"
        _make_raw(creator, base, size)
        qemu_apply(base, base_ops(cs, size), model, fmt="raw")
    elif backing == "qcow2":
        base = tmp_path / "base.qcow2"
        _make_qcow2(creator, base, size, 65536 if cs != 65536 else 4096)
        assert_qemu_clean(base)
        qemu_apply(base, base_ops(cs, size), model)
        assert_qemu_clean(base)
        imgchain_verify(base, model)
    if base is not None:
        images.append(base)
    top = tmp_path / "top.qcow2"
    _make_qcow2(creator, top, None if base else size, cs, base, backing if base else None)
    images.append(top)
    assert_qemu_clean(*images)
    with open_chain(top) as chain:
        assert [n.format_name for n in chain.nodes] == ["qcow2"] + ([backing] if base else [])
        assert chain.nodes[0].driver.cluster_size == cs
        assert chain.size == size
    return top, images, model


def _roundtrip(tmp_path: Path, top: Path, images: list[Path], model: bytearray, cs: int) -> None:
    size = len(model)
    backing_images = images[:-1]
    # 1. qemu-io writes, imgchain reads
    qemu_apply(top, qemu_ops(cs, size), model)
    assert_qemu_clean(*images)
    kinds = _kinds(top, cs)  # the ops made every cluster type imgchain must handle
    assert kinds[3] is kinds[4] is ClusterType.ZERO_ALLOC, kinds
    assert kinds[5] is kinds[6] is kinds[10] is kinds[11] is ClusterType.ZERO_PLAIN, kinds
    # qemu skips the discard of an unallocated cluster only when nothing is below
    assert kinds[12] is (ClusterType.ZERO_PLAIN if backing_images else ClusterType.UNALLOCATED), kinds
    assert kinds[7] is ClusterType.UNALLOCATED and kinds[0] is ClusterType.NORMAL, kinds
    imgchain_verify(top, model, seed=cs)
    qemu_verify(top, model)
    # 2. imgchain writes, qemu-io reads
    before = {p: _digest(p) for p in backing_images}
    imgchain_apply(top, imgchain_ops(cs, size), model)
    assert {p: _digest(p) for p in backing_images} == before, "a backing file changed"
    assert_qemu_clean(*images)
    kinds = _kinds(top, cs)
    assert kinds[2] is kinds[3] is kinds[9] is kinds[10] is ClusterType.ZERO_PLAIN, kinds
    assert kinds[4] is kinds[5] is kinds[7] is kinds[11] is ClusterType.NORMAL, kinds
    imgchain_verify(top, model, seed=cs + 1)
    assert qemu_verify(top, model) > 15
    qemu_compare(top, model, tmp_path)
    # 3. qemu-io writes into what imgchain wrote; both still agree
    qemu_apply(top, final_qemu_ops(cs, size), model)
    assert_qemu_clean(*images)
    imgchain_verify(top, model, seed=cs + 2)
    qemu_verify(top, model)
    qemu_compare(top, model, tmp_path)


@pytest.mark.parametrize("backing", ["none", "raw", "qcow2"])
@pytest.mark.parametrize("cs", CLUSTER_SIZES, ids=lambda c: f"cs{c}")
def test_imgchain_made_images_qemu_writes(tmp_path: Path, cs: int, backing: str):
    top, images, model = _build_chain(tmp_path, "imgchain", cs, backing)
    _roundtrip(tmp_path, top, images, model, cs)


@pytest.mark.parametrize("cs,backing", [(65536, "qcow2"), (65536, "raw"), (512, "qcow2"),
                                        (4096, "raw"), (2 * MiB, "qcow2")],
                         ids=lambda v: str(v))
def test_qemu_made_images_imgchain_writes(tmp_path: Path, cs: int, backing: str):
    top, images, model = _build_chain(tmp_path, "qemu", cs, backing)
    _roundtrip(tmp_path, top, images, model, cs)


def test_qemu_made_three_layer_chain(tmp_path: Path):
    """raw <- qcow2 (64 KiB) <- qcow2 (4 KiB), names relative, all made by qemu:
    imgchain's COW takes data from either lower layer, its zero clusters hide both."""
    size = 2 * MiB
    sub = tmp_path / "lower"
    sub.mkdir()
    base, mid, top = sub / "base.raw", sub / "mid.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-f", "raw", base, str(size), check=True)
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, check=True)
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "lower/mid.qcow2",
             "-F", "qcow2", top, check=True)
    model = bytearray(size)
    images = [mid, top]
    assert_qemu_clean(*images)
    qemu_apply(base, [P(0xC0, 0, 1 * MiB), P(0xC1, 1536 * KiB, 100 * KiB)], model, fmt="raw")
    qemu_apply(mid, [P(0xD0, 60 * KiB, 200 * KiB), Z(512 * KiB, 64 * KiB),
                     ZU(1536 * KiB, 64 * KiB), P(0xD1, 1600 * KiB - 3, 7)], model)
    assert_qemu_clean(*images)
    qemu_apply(top, [P(0xE0, 4096 * 3 + 5, 4096), Z(300 * KiB, 8 * KiB)], model)
    assert_qemu_clean(*images)
    imgchain_verify(top, model)
    qemu_verify(top, model)
    with open_chain(top) as chain:
        assert [n.format_name for n in chain.nodes] == ["qcow2", "qcow2", "raw"]
    digests = {p: _digest(p) for p in (base, mid)}
    imgchain_apply(top, [
        P(0xF0, 64 * KiB - 100, 50),        # COW: mid's 0xd0 around it
        P(0xF1, 20 * KiB + 7, 4096),        # COW from the raw base through mid
        P(0xF2, 516 * KiB + 1, 10),         # over mid's zero cluster hiding the base
        Z(1 * MiB - 4096, 8192),            # hides mid/base data at the base's 1 MiB edge
        Z(1536 * KiB + 100, 40 * KiB),      # partial, whole 4 KiB clusters, partial
        P(0xF3, 4096 * 3 + 4000, 200),      # in place over qemu's top data
        Z(0, 4096),                         # whole top cluster over base data
    ], model)
    assert {p: _digest(p) for p in (base, mid)} == digests
    assert_qemu_clean(*images)
    imgchain_verify(top, model)
    qemu_verify(top, model)
    qemu_compare(top, model, tmp_path)


# -- many writes in a 512-byte-cluster image ---------------------------------


def test_many_writes_512_byte_clusters(tmp_path: Path):
    """Scattered writes need many refcount blocks; a long write then grows the
    refcount table (one 512-byte table cluster covers 8 MiB of host file)."""
    cs, size = 512, 16 * MiB
    img = tmp_path / "small.qcow2"
    create_image(str(img), "qcow2", size, cluster_size=cs)
    h0 = _header_fields(img)
    assert h0["refcount_table_clusters"] == 1
    model = bytearray(size)
    rng = random.Random(512)
    ops: list[Op] = []
    for i in range(1500):
        off = rng.randrange(size - 2000)
        if i % 6 == 5:
            ops.append(Z(off, rng.randrange(1, 3 * cs)))
        else:
            ops.append(P(rng.randrange(1, 256), off, rng.randrange(1, 1500)))
    imgchain_apply(img, ops, model)
    assert_qemu_clean(img)
    blocks = _reftable_blocks(img)
    assert blocks >= 10, blocks  # several self-describing refcount blocks
    assert _header_fields(img)["refcount_table_clusters"] == 1
    # a long sequential write takes the host file past 8 MiB: the table grows
    imgchain_apply(img, [P(0x5A, 3 * MiB + 17, 8 * MiB)], model)
    h1 = _header_fields(img)
    assert os.path.getsize(img) > 8 * MiB
    assert h1["refcount_table_clusters"] > 1
    assert h1["refcount_table_offset"] != h0["refcount_table_offset"]
    assert _reftable_blocks(img) > 64
    assert_qemu_clean(img)
    imgchain_verify(img, model)
    qemu_compare(img, model, tmp_path)
    # qemu-io writes into it (new clusters, in place, zeroing, discards)
    q_ops = [P(0x11, 100, 70_000), P(0x12, 15 * MiB + 3, 40_000), Z(3 * MiB, 64 * KiB),
             ZU(4 * MiB, 64 * KiB), D(5 * MiB, 64 * KiB), P(0x13, 12 * MiB - 1, 2)]
    qemu_apply(img, q_ops, model)
    assert_qemu_clean(img)
    imgchain_verify(img, model)
    # and imgchain again after qemu, reusing what qemu freed
    imgchain_apply(img, [P(0x21, 4 * MiB + 1, 64 * KiB), P(0x22, 14 * MiB, 100_000)], model)
    assert_qemu_clean(img)
    imgchain_verify(img, model)
    qemu_compare(img, model, tmp_path)


# -- cluster reuse -------------------------------------------------------------


@pytest.mark.parametrize("cs", [512, 65536], ids=lambda c: f"cs{c}")
def test_cluster_reuse_keeps_file_bounded(tmp_path: Path, cs: int):
    """write, zero (frees clusters), write again, many times: freed clusters are
    reused, so the file never grows past what the live data can need."""
    size = 8 * MiB
    img = tmp_path / "reuse.qcow2"
    create_image(str(img), "qcow2", size, cluster_size=cs)
    region = max(256 * KiB, 16 * cs)
    starts = [0, 2 * MiB, 4 * MiB + 64 * KiB, 6 * MiB]  # four separate regions
    rbe = cs // 2  # 16-bit refcounts
    l2_span = cs * (cs // 8)
    initial = -(-os.path.getsize(img) // cs)
    l2_tables = sum(-(-(s + region) // l2_span) - s // l2_span for s in starts)
    per_region = region // cs + 2
    # live data: every region's latest write, plus one region written twice in
    # an iteration (before its zeroing frees the first copy)
    data = (len(starts) + 1) * per_region
    total = initial + l2_tables + data
    refblocks = -(-total // rbe) + 1
    bound = (total + refblocks + 2) * cs
    model = bytearray(size)
    rng = random.Random(cs)
    sizes = []
    for it in range(24):
        start = starts[it % len(starts)]
        a = rng.randrange(0, 2 * cs)
        n = rng.randrange(region // 2, region - 2 * cs)
        imgchain_apply(img, [P(it + 1, start + a, n)], model)
        assert_qemu_clean(img)
        zero_by = it % 3
        if zero_by == 0:
            imgchain_apply(img, [Z(start, region)], model)
        elif zero_by == 1:  # qemu frees, imgchain reuses
            qemu_apply(img, [ZU(start, region)], model)
        else:
            qemu_apply(img, [D(start, region)], model)
        assert_qemu_clean(img)
        freed = {ClusterType.ZERO_PLAIN, ClusterType.UNALLOCATED}  # qemu skips unallocated ones
        assert set(_kinds(img, cs, (start + region) // cs)[start // cs:]) <= freed
        b = rng.randrange(1, 3 * cs)
        imgchain_apply(img, [P(0x80 + it, start + b, region - b - rng.randrange(cs))], model)
        sizes.append(os.path.getsize(img))
        assert sizes[-1] <= bound, (it, sizes, bound)
        assert_qemu_clean(img)
    imgchain_verify(img, model)
    qemu_verify(img, model)
    # once every region has live data, an iteration can only add the transient
    # copy of one region (written before its zeroing frees the old one)
    assert sizes[-1] - sizes[len(starts) - 1] <= (per_region + 2) * cs, sizes
    # without reuse, 24 iterations would have appended about 48 regions of data
    assert max(sizes) < initial * cs + 12 * region
