"""Guest data never lands on qcow2 metadata (issue 7, QEMU's overlap checks).

Each image here has tables that contradict each other. Where a cheap check at
open can tell, a read-write open is refused; otherwise the write that would
land on metadata fails with EIO, the image is marked corrupt as QEMU marks
it, and the metadata is intact (qemu-img still reads the header).
"""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import pytest

import imgchain
from imgchain.create import create_image
from imgchain.errors import ImageIOError
from imgchain.formats import CorruptImage, ReadOnlyImage

from .conftest import qemu_img, qemu_io
from .mounting import cli, mount

CS = 4096


def u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def put_u64(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """4 KiB clusters, 4 MiB, guest data in the first cluster (one L2 table)."""
    path = tmp_path / "img.qcow2"
    create_image(str(path), "qcow2", 4 << 20, cluster_size=CS)
    with imgchain.open_chain(path, writable=True) as chain:
        chain.write(0, b"d" * CS)
    return path


def qemu_info(path: Path) -> dict:
    proc = qemu_img("info", "--output", "json", path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_refcount_table_on_the_header_is_refused_for_writing(image: Path, tmp_path: Path) -> None:
    put_u64(image, 48, 0)  # refcount_table_offset = 0: the header read as a table
    before = image.read_bytes()
    with pytest.raises(CorruptImage) as info:
        imgchain.open_chain(image, writable=True)
    assert str(info.value).startswith(f"{image}: refcount table at 0x0 overlaps with qcow2_header")
    disk = tmp_path / "disk.img"
    proc = cli("mount", image, disk)
    assert proc.returncode == 1 and "overlaps with qcow2_header" in proc.stderr
    assert image.read_bytes() == before  # nothing written
    with imgchain.open_chain(image) as chain:  # reading is still possible
        assert chain.read(0, CS) == b"d" * CS
    assert qemu_info(image)["format"] == "qcow2"


def test_l1_table_on_the_refcount_table_is_refused_for_writing(image: Path) -> None:
    put_u64(image, 40, u64(image, 48))  # l1_table_offset = refcount_table_offset
    with pytest.raises(CorruptImage, match="refcount table at 0x1000 overlaps with active L1 table"):
        imgchain.open_chain(image, writable=True)


def test_l1_entry_pointing_at_the_refcount_table_is_refused_for_writing(image: Path) -> None:
    l1 = u64(image, 40)
    put_u64(image, l1, (1 << 63) | u64(image, 48))  # L1 entry 0: its "L2 table" is the refcount table
    with pytest.raises(CorruptImage, match=r"active L2 table at 0x1000 \(L1 entry 0\) overlaps with refcount table"):
        imgchain.open_chain(image, writable=True)


def l2_entry_offset(image: Path) -> int:
    return u64(image, u64(image, 40)) & 0x00FFFFFFFFFFFE00  # entry 0 of the first L2 table


def test_data_cluster_on_the_refcount_table_fails_the_write_and_marks_the_image_corrupt(image: Path) -> None:
    reftable = u64(image, 48)
    put_u64(image, l2_entry_offset(image), (1 << 63) | reftable)  # guest cluster 0 -> the refcount table
    table_before = image.read_bytes()[reftable:reftable + CS]
    with imgchain.open_chain(image, writable=True) as chain:
        with pytest.raises(ImageIOError) as info:
            chain.write(100, b"x" * 10)
        assert info.value.errno == errno.EIO
        assert "Preventing invalid write on metadata (overlaps with refcount table)" in str(info.value)
        assert str(info.value).startswith(str(image))
        with pytest.raises(ImageIOError, match="image is corrupt"):
            chain.write(1 << 20, b"y")  # a sound cluster: refused too once corrupt
    assert image.read_bytes()[reftable:reftable + CS] == table_before
    assert qemu_info(image)["format-specific"]["data"]["corrupt"] is True
    with pytest.raises(ReadOnlyImage, match="corrupt"):
        imgchain.open_chain(image, writable=True)
    assert "corrupt; cannot be opened read/write" in qemu_io(image, "write 0 512").stderr  # QEMU agrees


def test_data_cluster_on_the_l1_table_fails_through_a_mount(image: Path, tmp_path: Path) -> None:
    l1 = u64(image, 40)
    put_u64(image, l2_entry_offset(image), (1 << 63) | l1)  # guest cluster 0 -> the L1 table
    l1_before = image.read_bytes()[l1:l1 + CS]
    disk = tmp_path / "disk.img"
    with mount(image, disk):
        fd = os.open(disk, os.O_WRONLY)
        try:
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"z" * 512, 0)
            assert info.value.errno == errno.EIO
        finally:
            os.close(fd)
        assert disk.read_bytes()[1 << 20:(1 << 20) + 4] == b"\0" * 4  # still serving reads
    assert image.read_bytes()[l1:l1 + CS] == l1_before
    assert qemu_info(image)["format-specific"]["data"]["corrupt"] is True


def test_refcounts_that_call_metadata_free_fail_the_allocation(image: Path) -> None:
    """A refcount block that says the L1 table and the L2 table are free: the
    allocator must not hand them out for guest data."""
    reftable = u64(image, 48)
    block = u64(image, reftable)
    with open(image, "r+b") as f:
        f.seek(block)
        f.write(b"\0" * CS)  # every refcount of the first block zero
    l1, l2 = u64(image, 40), l2_entry_offset(image) & ~(CS - 1)
    before = image.read_bytes()
    with imgchain.open_chain(image, writable=True) as chain:
        with pytest.raises(ImageIOError, match="Preventing invalid write on metadata"):
            chain.write(2 << 20, b"n" * CS)  # needs a new L2 table and a data cluster
    after = image.read_bytes()
    for start in (l1, l2, reftable):
        assert after[start:start + CS] == before[start:start + CS], hex(start)
    assert after[:72] == before[:72] and after[80:CS] == before[80:CS]  # the corrupt bit aside
    assert b"n" * 16 not in after
    assert qemu_info(image)["format-specific"]["data"]["corrupt"] is True


def test_a_sound_image_still_writes_after_the_checks(tmp_path: Path) -> None:
    """The checks follow the tables the driver adds: a refcount table that
    grows, new L2 tables and refcount blocks, then qemu-img check is clean."""
    path = tmp_path / "grow.qcow2"
    create_image(str(path), "qcow2", 256 << 20, cluster_size=512)
    with imgchain.open_chain(path, writable=True) as chain:
        for i in range(0, 256 << 20, 1 << 20):
            chain.write(i, b"q" * 1024)
    proc = qemu_img("check", path)
    assert proc.returncode == 0, proc.stdout
