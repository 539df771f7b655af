"""QEMU-compatible image locks, both ways, with real qemu-io and qemu-img."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import imgchain
from imgchain.locks import ImageLockedError

from .conftest import qemu_img, qemu_io, wait_until_write_locked


@pytest.fixture
def held_by_qemu(chain3: Path):
    """qemu-io keeps top.qcow2 open read-write (its chain locked) while the test runs."""
    proc = subprocess.Popen(["qemu-io", "-c", "sleep 20000", str(chain3)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until_write_locked(chain3, proc)
    yield chain3
    proc.kill()
    proc.wait()


def test_imgchain_writer_refused_while_qemu_writes(held_by_qemu: Path) -> None:
    with pytest.raises(ImageLockedError) as info:
        imgchain.open_chain(held_by_qemu, writable=True)
    assert str(held_by_qemu) in str(info.value)
    assert "in use by another process" in str(info.value)


def test_imgchain_reader_needs_force_share(held_by_qemu: Path) -> None:
    with pytest.raises(ImageLockedError, match='Failed to get shared "write" lock'):
        imgchain.open_chain(held_by_qemu)
    with imgchain.open_chain(held_by_qemu, force_share=True) as chain:
        assert chain.read(0, 4) == b"\xaa" * 4


def test_qemu_refused_while_imgchain_writes(chain3: Path) -> None:
    with imgchain.open_chain(chain3, writable=True):
        proc = qemu_io(chain3, "write 0 512")
        assert proc.returncode != 0
        assert 'Failed to get "write" lock' in proc.stderr
        assert "Is another process using the image" in proc.stderr
        assert qemu_img("info", chain3).returncode != 0
        assert qemu_img("info", "-U", chain3).returncode == 0
        base = chain3.parent / "base.raw"
        proc = qemu_io(base, "write 0 512", fmt="raw")  # backing nodes are held with write unshared
        assert proc.returncode != 0 and "lock" in proc.stderr
    assert qemu_io(chain3, "write 0 512").returncode == 0  # released on close


def test_two_imgchain_writers_conflict(chain3: Path) -> None:
    with imgchain.open_chain(chain3, writable=True):
        with pytest.raises(ImageLockedError):
            imgchain.open_chain(chain3, writable=True)
    with imgchain.open_chain(chain3, writable=True):
        pass
