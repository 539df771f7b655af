"""The qcow2 write-back in steps (`write_back_steps`), whose barriers a job runs in a worker thread.

Each step stops where the file must be durable before the next writes: what
another reader of the file (qemu-io) sees between the steps is the proof of
the order: the data's L2 entry never before the barrier after the data, the
new L2 table's L1 entry never before the barrier after the table.
"""

from __future__ import annotations

from pathlib import Path

from imgchain.chain import open_image

from .conftest import qemu_img, qemu_io

MIB = 1 << 20


def reads_back(image: Path, pattern: int) -> bool:
    """Does qemu-io (sharing the file) read 64 KiB of `pattern` at 1 MiB?"""
    proc = qemu_io(image, f"read -P {pattern} 1M 64k", extra=("-U", "-r"))
    return "Pattern verification failed" not in proc.stdout + proc.stderr and proc.returncode == 0


def test_write_back_steps_stop_at_each_barrier(tmp_path: Path) -> None:
    image = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "64M", check=True)
    node = open_image(str(image), writable=True)
    try:
        node.write(MIB, b"\x5a" * 65536)  # a new cluster in a new L2 table: pending L2 and L1 entries
        steps = node.write_back_steps()
        seen = []
        for _ in steps:  # each stop: a barrier is due before the next writes
            seen.append(reads_back(image, 0x5a))
            node.sync_file()
        seen.append(reads_back(image, 0x5a))
        assert seen == [False, False, True], seen  # data; table written, L1 not yet; then the L1 entry
        assert list(node.write_back_steps()) == []  # nothing left pending
    finally:
        node.close()
    assert qemu_img("check", image).returncode == 0
    assert reads_back(image, 0x5a)


def test_write_back_runs_the_same_steps_with_its_own_barriers(tmp_path: Path) -> None:
    image = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "64M", check=True)
    node = open_image(str(image), writable=True)
    try:
        node.write(MIB, b"\x5a" * 65536)
        assert not reads_back(image, 0x5a)
        node.write_back()
        assert reads_back(image, 0x5a)
    finally:
        node.close()
    assert qemu_img("check", image).returncode == 0
