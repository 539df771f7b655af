"""`stat` of the mounted file: its size is the virtual size, its blocks what the chain's image
files take on the host (the sum of their allocated blocks), so `du` of a mounted 1 TiB chain
says how much disk the chain uses, not 1 TiB. Checked against the files' own `stat` and `du`,
before and after writes through the mount.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from .conftest import qemu_img, qemu_io
from .mounting import dd, mount

MIB, TIB = 1 << 20, 1 << 40


def allocated(files: list[Path]) -> int:
    """What `du` counts for the files: allocated 512-byte blocks."""
    return sum(os.stat(f).st_blocks for f in files)


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-B1", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def test_du_of_a_mounted_chain_is_what_its_files_take(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1T", check=True)
    assert qemu_io(base, "write -P 1 0 3M", "write -P 2 512G 1M", fmt="qcow2").returncode == 0
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, check=True)
    assert qemu_io(top, "write -P 3 1M 1M", fmt="qcow2").returncode == 0
    files = [top, base]
    with mount(top, tmp_path / "disk") as mnt:
        st = os.stat(mnt)
        assert st.st_size == TIB
        assert st.st_blocks == allocated(files)
        assert du_bytes(mnt) == 512 * allocated(files) < 16 * MIB  # not 1 TiB
        before = st.st_blocks
        dd(f"if=/dev/urandom", f"of={mnt}", "bs=1M", "count=8", "seek=100", "conv=fsync,notrunc")
        deadline = time.monotonic() + 10  # attributes are cached for a second (kernel and daemon)
        while os.stat(mnt).st_blocks != allocated(files) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert os.stat(mnt).st_blocks == allocated(files) >= before + 8 * MIB // 512
