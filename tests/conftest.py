"""Shared helpers: real qemu-img/qemu-io runs and small chain builders."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from imgchain.create import create_image

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "testimages" / "fixtures"

for tool in ("qemu-img", "qemu-io"):
    if shutil.which(tool) is None:  # the setup installs them: their absence is a failure
        raise RuntimeError(f"{tool} is not installed; run `make test`, which installs qemu-utils")


def qemu_img(*args: str | os.PathLike[str], check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"qemu-img {args} -> {proc.returncode}: {proc.stderr}")
    return proc


def qemu_io(image: str | os.PathLike[str], *commands: str, fmt: str | None = None,
            extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-io", *extra]
    if fmt:
        argv += ["-f", fmt]
    for c in commands:
        argv += ["-c", c]
    return subprocess.run([*argv, str(image)], capture_output=True, text=True)


def fdatasync_failing_once(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A disk's EIO on fdatasync, as Linux reports a lost write-back: once.
    Returns a list: the next fdatasync of each file descriptor put in it fails."""
    import errno
    real = os.fdatasync
    failing: list[int] = []

    def fdatasync(fd: int) -> None:
        if fd in failing:
            failing.remove(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return failing


def assert_qemu_clean(*images: str | os.PathLike[str]) -> None:
    """qemu-img check exits 0 with "No errors" on every qcow2 image given."""
    for image in images:
        if str(image).endswith(".qcow2"):
            proc = qemu_img("check", image)
            assert proc.returncode == 0, f"{image}: {proc.stdout}{proc.stderr}"
            assert "No errors were found on the image." in proc.stdout


@pytest.fixture
def chain3(tmp_path: Path) -> Path:
    """base.raw (4 MiB, patterned) <- mid.qcow2 <- top.qcow2 (4 KiB clusters); returns top."""
    return make_chain3(tmp_path)


def make_chain3(tmp_path: Path) -> Path:
    """The chain of the `chain3` fixture, made in `tmp_path`."""
    base = tmp_path / "base.raw"
    create_image(str(base), "raw", 4 << 20)
    with open(base, "r+b") as f:
        f.write(b"\xaa" * (1 << 20))
    create_image(str(tmp_path / "mid.qcow2"), backing_file="base.raw", backing_format="raw")
    create_image(str(tmp_path / "top.qcow2"), backing_file="mid.qcow2", cluster_size=4096)
    return tmp_path / "top.qcow2"


def wait_until_write_locked(path: str | os.PathLike[str], proc: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until some process holds QEMU's "write" permission byte on `path`.

    Polls with F_OFD_GETLK only, so the waiting never takes a lock that could
    race with the process being waited for (qemu-img info would)."""
    import time

    from imgchain.locks import PERM_BASE, Perm, _held_by_other

    fd = os.open(path, os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout
        while not _held_by_other(fd, PERM_BASE + Perm.WRITE):
            if proc.poll() is not None:
                raise AssertionError(f"{proc.args} exited {proc.returncode}: {proc.stderr and proc.stderr.read()}")
            assert time.monotonic() < deadline, f"{path} was never locked"
            time.sleep(0.02)
    finally:
        os.close(fd)


@pytest.fixture(autouse=True, scope="session")
def _private_runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Mount records of the tests live in a directory of their own."""
    os.environ["IMGCHAIN_RUNTIME_DIR"] = str(tmp_path_factory.mktemp("runtime"))
