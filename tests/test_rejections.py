"""Every image the subset refuses ends in a FormatError naming the file and the reason.

Cases are made by qemu-img (testimages/fixtures) or by patching bytes of an
image imgchain created; each test pins the message.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

import imgchain
from imgchain.create import create_image
from imgchain.formats import CorruptImage, FormatError, ReadOnlyImage, UnsupportedFeature

from .conftest import FIXTURES, qemu_img


def patch(path: Path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "img.qcow2"
    create_image(str(path), "qcow2", 4 << 20)
    with imgchain.open_chain(path, writable=True) as chain:
        chain.write(0, b"x" * 70000)
    return path


def expect(path: Path, kind: type[FormatError], text: str, writable: bool = False) -> None:
    with pytest.raises(kind) as info:
        imgchain.open_chain(path, writable=writable)
    assert text in str(info.value)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fixture, kind, text", [
    ("v2.qcow2", UnsupportedFeature, "qcow2 v2 unsupported"),
    ("luks.qcow2", UnsupportedFeature, "encrypted images are not supported (LUKS)"),
    ("extl2.qcow2", UnsupportedFeature, "unsupported qcow2 feature: extended L2"),
    ("datafile.qcow2", UnsupportedFeature, "unsupported qcow2 feature: external data file"),
    ("zstd.qcow2", UnsupportedFeature, "unsupported qcow2 feature: compression type"),
])
def test_qemu_made_images_refused(fixture: str, kind: type[FormatError], text: str) -> None:
    expect(FIXTURES / fixture, kind, text)


@pytest.mark.parametrize("offset, fmt, value, kind, text", [
    (4, ">I", 4, UnsupportedFeature, "Unsupported qcow2 version 4"),
    (32, ">I", 1, UnsupportedFeature, "encrypted images are not supported (AES)"),
    (72, ">Q", 1 << 5, UnsupportedFeature, "Unsupported qcow2 feature(s): Unknown incompatible feature: 20"),
    (72, ">Q", 1 << 4, UnsupportedFeature, "unsupported qcow2 feature: extended L2"),
    (20, ">I", 8, UnsupportedFeature, "Unsupported cluster size: 2^8"),
    (20, ">I", 22, UnsupportedFeature, "Unsupported cluster size: 2^22"),
    (100, ">I", 96, CorruptImage, "qcow2 header too short"),
    (100, ">I", 1 << 17, CorruptImage, "qcow2 header exceeds cluster size"),
    (96, ">I", 7, CorruptImage, "Reference count entry width too large"),
    (8, ">Q", 1 << 20, CorruptImage, "Invalid backing file offset"),
    (40, ">Q", 1 << 30, CorruptImage, "L1 table lies outside the file"),
    (40, ">Q", 12345, CorruptImage, "Invalid L1 table offset"),
    (48, ">Q", 1 << 30, CorruptImage, "reference count table lies outside the file"),
    (56, ">I", 0, CorruptImage, "Image does not contain a reference count table"),
    (36, ">I", 0, CorruptImage, "L1 table is too small"),
])
def test_patched_header_refused(image: Path, offset: int, fmt: str, value: int,
                                kind: type[FormatError], text: str) -> None:
    patch(image, offset, fmt, value)
    expect(image, kind, text)


def test_short_file(tmp_path: Path) -> None:
    path = tmp_path / "short.qcow2"
    path.write_bytes(b"QFI\xfb\0\0\0\x03" + bytes(40))
    expect(path, CorruptImage, "qcow2 header too short")


def test_overlong_backing_name(tmp_path: Path) -> None:
    create_image(str(tmp_path / "b.qcow2"), "qcow2", 1 << 20)
    top = tmp_path / "t.qcow2"
    create_image(str(top), backing_file="b.qcow2")
    patch(top, 16, ">I", 2000)
    expect(top, CorruptImage, "Backing file name too long")


def test_extension_overrunning_area(image: Path) -> None:
    patch(image, 0x74, ">I", 0xFFFF)  # length of the first extension (feature table)
    expect(image, CorruptImage, "Header extension too large")


def test_backing_format_too_long(tmp_path: Path) -> None:
    create_image(str(tmp_path / "b.qcow2"), "qcow2", 1 << 20)
    top = tmp_path / "t.qcow2"
    create_image(str(top), backing_file="b.qcow2")
    patch(top, 0x74, ">I", 20)  # the backing-format extension comes first
    expect(top, CorruptImage, "ext_backing_format: len=20 too large")


@pytest.mark.parametrize("bit, text", [
    (0, "image dirty, run `qemu-img check -r all`"),
    (1, "qcow2: Image is corrupt; cannot be opened read/write"),
])
def test_dirty_and_corrupt_are_read_only(image: Path, bit: int, text: str) -> None:
    patch(image, 72, ">Q", 1 << bit)
    with imgchain.open_chain(image) as chain:
        assert chain.read(0, 70000) == b"x" * 70000
    expect(image, ReadOnlyImage, text, writable=True)


@pytest.mark.parametrize("fixture, text", [
    ("snapshot.qcow2", "internal snapshot(s); writes are not supported"),
    ("bitmaps.qcow2", "has persistent bitmaps; remove with `qemu-img bitmap --remove`"),
])
def test_read_only_features(tmp_path: Path, fixture: str, text: str) -> None:
    copy = tmp_path / fixture
    shutil.copy(FIXTURES / fixture, copy)
    with imgchain.open_chain(copy) as chain:
        assert len(chain.read(0, 4096)) == 4096
    expect(copy, ReadOnlyImage, text, writable=True)


def test_refcount_width_other_than_16_is_read_only(tmp_path: Path) -> None:
    path = tmp_path / "r8.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "refcount_bits=8", path, "1M", check=True)
    with imgchain.open_chain(path) as chain:
        assert chain.read(0, 512) == bytes(512)
    expect(path, ReadOnlyImage, "refcount width 8 bits", writable=True)


def test_unknown_autoclear_bits_are_cleared_on_write(image: Path) -> None:
    patch(image, 88, ">Q", 1 << 7 | 1)  # unknown bit 7 and bitmaps bit without extension
    with imgchain.open_chain(image, writable=True) as chain:
        chain.write(0, b"y")
    with open(image, "rb") as f:
        f.seek(88)
        assert struct.unpack(">Q", f.read(8))[0] == 0
    assert qemu_img("check", image).returncode == 0


def test_compressed_clusters_read(tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"abc" * 100_000)
    comp = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, comp, check=True)
    with imgchain.open_chain(comp) as chain:
        assert chain.read(0, 300_000) == raw.read_bytes()
