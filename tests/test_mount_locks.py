"""Lock interplay of a mount with qemu-io and qemu-storage-daemon, both ways."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import qemu_img, qemu_io, wait_until_write_locked
from .mounting import cli, is_mountpoint, mount


def test_qemu_io_cannot_write_a_mounted_image(chain3: Path) -> None:
    with mount(chain3, chain3.parent / "disk.img"):
        proc = qemu_io(chain3, "write 0 512")
        assert proc.returncode != 0
        assert 'Failed to get "write" lock' in proc.stderr
        assert "Is another process using the image" in proc.stderr
        # read-only tools work with -U, as QEMU asks for it
        assert qemu_img("info", chain3).returncode != 0
        for command in (["info"], ["map"], ["check"]):
            proc = cli(*command, "-U", chain3)
            assert proc.returncode == 0, proc.stderr
            plain = cli(*command, chain3)
            assert plain.returncode == 1 and 'Failed to get shared "write" lock' in plain.stderr
        assert json.loads(cli("info", "-U", "--output", "json", chain3).stdout)["format"] == "qcow2"


@pytest.fixture
def qsd_export(chain3: Path):
    """qemu-storage-daemon exports top.qcow2 writable over its own FUSE export."""
    target = chain3.parent / "qsd.img"
    target.touch()
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,filename={chain3},node-name=file0",
         "--blockdev", "driver=qcow2,file=file0,node-name=fmt0",
         "--export", f"type=fuse,id=exp0,node-name=fmt0,mountpoint={target},writable=on"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until_write_locked(chain3, proc)
    deadline = time.monotonic() + 30
    while not is_mountpoint(target):
        assert time.monotonic() < deadline, "qemu-storage-daemon did not mount"
        time.sleep(0.05)
    yield chain3
    proc.terminate()
    proc.wait(timeout=60)


def test_mount_refused_while_qemu_storage_daemon_holds_it(qsd_export: Path) -> None:
    disk = qsd_export.parent / "disk.img"
    proc = cli("mount", qsd_export, disk)
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert line.startswith("imgchain: error: ") and len(line.splitlines()) == 1
    assert str(qsd_export) in line and "in use by another process" in line
    assert not disk.exists() and not is_mountpoint(disk)


def test_qemu_storage_daemon_refused_while_mounted(chain3: Path) -> None:
    target = chain3.parent / "qsd.img"
    target.touch()
    with mount(chain3, chain3.parent / "disk.img"):
        proc = subprocess.run(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,filename={chain3},node-name=file0",
             "--blockdev", "driver=qcow2,file=file0,node-name=fmt0",
             "--export", f"type=fuse,id=exp0,node-name=fmt0,mountpoint={target},writable=on"],
            capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert 'Failed to get "write" lock' in proc.stderr, proc.stderr
