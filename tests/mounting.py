"""Helpers for tests that mount chains for real (FUSE), run the CLI, and use qemu."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

IMGCHAIN = str(Path(sys.executable).with_name("imgchain"))


def cli(*args: str | os.PathLike[str], env: dict[str, str] | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IMGCHAIN, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def require_fuse() -> None:
    """A FUSE test that cannot mount fails (it never skips): say why clearly."""
    assert os.path.exists("/dev/fuse"), "/dev/fuse is missing: FUSE tests need it"


def mounted_pid(mountpoint: Path) -> int:
    for record in json.loads(cli("mounts", "--output", "json").stdout):
        if record["mountpoint"] == str(mountpoint.resolve()):
            return int(record["pid"])
    raise AssertionError(f"{mountpoint} is not in `imgchain mounts`")


def is_mountpoint(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def wait_gone(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise AssertionError(f"daemon {pid} still running after {timeout} s")


@contextmanager
def mount(image: Path, mountpoint: Path, *options: str) -> Iterator[Path]:
    """`imgchain mount` in the background; always unmounted afterwards."""
    require_fuse()
    proc = cli("mount", *options, image, mountpoint)
    assert proc.returncode == 0, f"mount failed: {proc.stderr}"
    try:
        yield mountpoint
    finally:
        if is_mountpoint(mountpoint):
            done = cli("unmount", mountpoint)
            assert done.returncode == 0, done.stderr


def dd(*operands: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["dd", "status=none", *operands], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc
