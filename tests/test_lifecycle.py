"""The mount's life as users meet it: any directory, failed starts, dead daemons, the runtime directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from .conftest import REPO
from .mounting import cli, is_mountpoint, require_fuse

PACKAGE_FILES = ("pyproject.toml", "README.md", "imgchain", "formats", "fuse", "cli")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the project installed normally (not editable).

    The dependencies come from the test's own environment through a .pth
    line; the project is built from a copy of the sources with `pip install
    --no-deps` (pip fetches setuptools for the build, or takes it from its
    cache). Returns the environment's bin/."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "src"
    source.mkdir()
    for name in PACKAGE_FILES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "imgchain-test-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                           "--ignore-installed", source],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    where = subprocess.run([python, "-c", "import imgchain.fuse.daemon as d; print(d.__file__)"],
                           capture_output=True, text=True, cwd=root)
    assert where.stdout.startswith(site), where.stdout + where.stderr  # the installed copy, not the clone
    return venv / "bin"


def test_mount_from_the_root_of_a_clone(installed: Path, chain3: Path) -> None:
    """With the project installed normally, the clone's imgchain/ in the current
    directory must not shadow the installed package in the daemon."""
    require_fuse()
    imgchain = str(installed / "imgchain")
    disk = chain3.parent / "disk.img"
    proc = subprocess.run([imgchain, "mount", chain3, disk], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    try:
        assert is_mountpoint(disk)
        assert disk.stat().st_size == 4 << 20
        with open(disk, "rb") as f:
            assert f.read(16) == b"\xaa" * 16
    finally:
        done = subprocess.run([imgchain, "unmount", disk], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert not is_mountpoint(disk)
