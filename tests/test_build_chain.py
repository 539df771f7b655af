"""testimages/build_chain.py builds chains that qemu-img checks clean and reads identically."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, assert_qemu_clean, qemu_img


@pytest.mark.parametrize("raw_base", [False, True])
def test_builder_makes_a_clean_chain(tmp_path: Path, raw_base: bool) -> None:
    argv = [sys.executable, str(REPO / "testimages" / "build_chain.py"), str(tmp_path / "c"),
            "--layers", "4", "--size", "8M", "--cluster-size", "4K", "--seed", "3"]
    proc = subprocess.run(argv + (["--raw-base"] if raw_base else []), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    top, digest = proc.stdout.split()
    images = sorted((tmp_path / "c").iterdir())
    assert len(images) == 4 and top.endswith("layer3.qcow2")
    assert_qemu_clean(*images)
    qemu_img("convert", "-O", "raw", top, tmp_path / "flat.raw", check=True)
    assert hashlib.sha256((tmp_path / "flat.raw").read_bytes()).hexdigest() == digest
    assert qemu_img("info", "--backing-chain", top).stdout.count("image:") == 4
