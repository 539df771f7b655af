"""Chain opening as QEMU does it, and the guest view through the chain."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import imgchain
from imgchain.chain import resolve_backing_name
from imgchain.create import create_image
from imgchain.errors import BackingError

from .conftest import assert_qemu_clean, qemu_img, qemu_io


def test_relative_name_resolves_against_overlay_directory(tmp_path: Path, monkeypatch) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    create_image(str(sub / "base.qcow2"), "qcow2", 1 << 20)
    create_image(str(sub / "top.qcow2"), backing_file="base.qcow2")
    monkeypatch.chdir(tmp_path)
    with imgchain.open_chain("sub/top.qcow2") as chain:
        assert [n.filename for n in chain.nodes] == ["sub/top.qcow2", "sub/base.qcow2"]
        assert [n.node_name for n in chain.nodes] == ["top", "base"]
    info = qemu_img("info", "--output=json", "sub/top.qcow2").stdout
    assert '"full-backing-filename": "sub/base.qcow2"' in info


def test_resolution_is_lexical() -> None:
    assert resolve_backing_name("other/up.qcow2", "../sub/x") == "other/../sub/x"
    assert resolve_backing_name("a/b.qcow2", "/abs/c") == "/abs/c"
    assert resolve_backing_name("top.qcow2", "base.raw") == "base.raw"


def test_protocol_prefix_refused(tmp_path: Path) -> None:
    create_image(str(tmp_path / "we:ird.qcow2"), "qcow2", 1 << 20)
    top = tmp_path / "top.qcow2"
    create_image(str(top), "qcow2", 1 << 20)
    with imgchain.open_chain(top, writable=True):
        pass
    from imgchain.rebase import rebase
    rebase(str(top), "we:ird.qcow2", "qcow2", unsafe=True)
    with pytest.raises(BackingError, match="Unknown protocol 'we'"):
        imgchain.open_chain(top)
    rebase(str(top), "./we:ird.qcow2", "qcow2", unsafe=True)
    with imgchain.open_chain(top) as chain:
        assert len(chain.nodes) == 2


def test_missing_backing_names_overlay_and_path(tmp_path: Path) -> None:
    create_image(str(tmp_path / "base.qcow2"), "qcow2", 1 << 20)
    top = tmp_path / "top.qcow2"
    create_image(str(top), backing_file="base.qcow2")
    os.unlink(tmp_path / "base.qcow2")
    with pytest.raises(BackingError) as info:
        imgchain.open_chain(top)
    message = str(info.value)
    assert str(top) in message and str(tmp_path / "base.qcow2") in message
    assert "No such file or directory" in message


def test_loop_detected_by_inode(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create_image(str(a), "qcow2", 1 << 20)
    create_image(str(b), backing_file="a.qcow2")
    from imgchain.rebase import rebase
    rebase(str(a), "b.qcow2", "qcow2", unsafe=True)
    with pytest.raises(BackingError, match="Backing file 'b.qcow2' creates an infinite loop"):
        imgchain.open_chain(b)
    os.symlink(a, tmp_path / "link.qcow2")
    rebase(str(a), "link.qcow2", "qcow2", unsafe=True)  # a -> link(a): same inode
    with pytest.raises(BackingError, match="creates an infinite loop"):
        imgchain.open_chain(a)


def test_backing_format_from_header_not_probed(tmp_path: Path) -> None:
    """A qcow2 base recorded as raw is read as raw bytes, as QEMU does."""
    base = tmp_path / "base.qcow2"
    create_image(str(base), "qcow2", 1 << 20)
    top = tmp_path / "top.qcow2"
    create_image(str(top), "qcow2", 1 << 20, "base.qcow2", "raw")
    with imgchain.open_chain(top) as chain:
        assert chain.nodes[1].format_name == "raw"
        assert chain.read(0, 4) == b"QFI\xfb"


def test_reads_past_shorter_backing_are_zeros(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x55" * 1000)  # not even a sector multiple
    top = tmp_path / "top.qcow2"
    create_image(str(top), "qcow2", 1 << 20, "base.raw", "raw", 4096)
    with imgchain.open_chain(top, writable=True) as chain:
        assert chain.read(0, 2000) == b"\x55" * 1000 + bytes(1000)
        chain.write(990, b"\x77" * 20)  # COW of a cluster the backing only partly covers
        assert chain.read(0, 2000) == b"\x55" * 990 + b"\x77" * 20 + bytes(990)
    assert_qemu_clean(top)


def test_zero_clusters_hide_backing(chain3: Path) -> None:
    with imgchain.open_chain(chain3, writable=True) as chain:
        chain.write_zeroes(4096, 3 * 4096 + 100)  # 3 whole clusters, then a partial one
        assert chain.read(0, 5 * 4096) == b"\xaa" * 4096 + bytes(3 * 4096 + 100) + b"\xaa" * (4096 - 100)
    proc = qemu_io(chain3, "read -P 0 4096 12388", "read -P 0xaa 16484 3996")
    assert proc.returncode == 0 and "Pattern verification failed" not in proc.stdout
    assert_qemu_clean(chain3, chain3.parent / "mid.qcow2")


def test_partial_write_copies_on_write(chain3: Path) -> None:
    with imgchain.open_chain(chain3, writable=True) as chain:
        chain.write(5000, b"\x01" * 10)
    mid = chain3.parent / "mid.qcow2"
    # top now owns cluster 1 (4096..8191) with the backing data around the write
    proc = qemu_io(chain3, "read -P 0xaa 4096 904", "read -P 0x01 5000 10", "read -P 0xaa 5010 3182")
    assert "Pattern verification failed" not in proc.stdout and proc.returncode == 0
    with imgchain.open_chain(chain3) as chain:
        top = chain.nodes[0]
        statuses = top.driver.block_status(4096, 4096)
        assert [e.status.value for e in statuses] == ["data"]
    assert_qemu_clean(chain3, mid)


def test_only_active_image_is_writable(chain3: Path) -> None:
    with imgchain.open_chain(chain3, writable=True) as chain:
        assert [n.writable for n in chain.nodes] == [True, False, False]


def test_out_of_range_requests(chain3: Path) -> None:
    with imgchain.open_chain(chain3, writable=True) as chain:
        with pytest.raises(imgchain.ImageIOError, match="beyond the end of the image"):
            chain.write(chain.size - 1, b"ab")
        with pytest.raises(imgchain.ImageIOError):
            chain.read(chain.size, 1)


def test_read_only_chain_refuses_writes(chain3: Path) -> None:
    with imgchain.open_chain(chain3) as chain:
        with pytest.raises(imgchain.ImageIOError, match="read-only"):
            chain.write(0, b"x")
