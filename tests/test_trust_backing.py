"""Root and the backing files of images it did not make (issue 7).

An image owned by another user whose chain reaches a file that user could
not read is refused when root opens it (mount, check, map, compare, the
Python API), with a message naming the image, the backing file and why;
`--trust-backing` opens it; `info --backing-chain` shows where each backing
name really points. These tests run as root (as CI does) and make the images
belong to `nobody`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

import imgchain
from imgchain.create import create_image
from imgchain.errors import BackingError

from .mounting import cli, mount

NOBODY = 65534


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user can search (pytest's own tmp dirs are 0700)."""
    assert os.geteuid() == 0, "these tests check what root may open: run the suite as root"
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="imgchain-trust-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def user_image(directory: Path, backing: str, backing_fmt: str = "raw") -> Path:
    """An overlay made by `nobody` whose backing name is `backing`."""
    top = directory / "evil.qcow2"
    create_image(str(top), "qcow2", 1 << 20, backing_file=backing, backing_format=backing_fmt)
    os.chown(top, NOBODY, NOBODY)
    return top


def secret(directory: Path, mode: int = 0o600) -> Path:
    path = directory / "secret.raw"
    path.write_bytes(b"root's secret".ljust(1 << 20, b"\0"))
    path.chmod(mode)
    return path


def test_root_refuses_a_backing_file_the_owner_cannot_read(public_dir: Path) -> None:
    hidden = secret(public_dir)
    top = user_image(public_dir, str(hidden))
    with pytest.raises(BackingError) as info:
        imgchain.open_chain(top)
    message = str(info.value)
    assert message.startswith(f"{top}: refusing backing file '{hidden}' of '{top}'")
    assert f"not readable by uid {NOBODY}" in message and "mode 0600" in message
    assert "--trust-backing" in message
    with imgchain.open_chain(top, trust_backing=True) as chain:
        assert chain.read(0, 13) == b"root's secret"


@pytest.mark.parametrize("command", [["check"], ["map"], ["compare", "OTHER"]])
def test_cli_commands_refuse_and_trust_backing_opens(public_dir: Path, command: list[str]) -> None:
    hidden = secret(public_dir)
    top = user_image(public_dir, "secret.raw")
    args = [str(top) if a == "OTHER" else a for a in command]
    proc = cli(*args, top)
    assert proc.returncode in (1, 2), proc.stdout
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"refusing backing file '{hidden}'" in proc.stderr
    trusted = cli(*args[:1], "--trust-backing", *args[1:], top)
    assert trusted.returncode == 0, trusted.stderr


def test_a_directory_the_owner_cannot_search_is_named(public_dir: Path) -> None:
    private = public_dir / "private"
    private.mkdir(mode=0o700)
    secret(private, mode=0o644)  # readable, but behind a directory nobody cannot enter
    top = user_image(public_dir, "private/secret.raw")
    with pytest.raises(BackingError, match=f"directory '{private}' is not searchable by uid {NOBODY}"):
        imgchain.open_chain(top)


def test_a_symlink_to_a_root_file_is_refused(public_dir: Path) -> None:
    hidden = secret(public_dir)
    (public_dir / "innocent.raw").symlink_to(hidden)
    top = user_image(public_dir, "innocent.raw")
    with pytest.raises(BackingError, match=f"'{public_dir}/innocent.raw' \\(which is '{hidden}'\\)"):
        imgchain.open_chain(top)


def test_files_the_owner_can_read_are_opened(public_dir: Path) -> None:
    readable = secret(public_dir, mode=0o644)
    top = user_image(public_dir, "secret.raw")
    with imgchain.open_chain(top) as chain:  # world-readable: nothing to refuse
        assert chain.read(0, 4) == b"root"
    own = public_dir / "own.raw"
    shutil.copy(readable, own)
    own.chmod(0o600)
    os.chown(own, NOBODY, NOBODY)
    top = user_image(public_dir, "own.raw")
    with imgchain.open_chain(top) as chain:  # the owner's own file, mode 0600
        assert chain.read(0, 4) == b"root"
    os.chown(top, 0, 0)
    hidden_top = user_image(public_dir, str(secret(public_dir)))
    os.chown(hidden_top, 0, 0)  # root's own image: root's own business
    with imgchain.open_chain(hidden_top) as chain:
        assert chain.read(0, 4) == b"root"


def test_mount_refuses_and_mounts_with_trust_backing(public_dir: Path) -> None:
    hidden = secret(public_dir)
    top = user_image(public_dir, str(hidden))
    disk = public_dir / "disk.img"
    proc = cli("mount", "--allow-other", top, disk)
    assert proc.returncode == 1
    assert proc.stderr.startswith("imgchain: error: ") and f"refusing backing file '{hidden}'" in proc.stderr
    assert not disk.exists()
    with mount(top, disk, "--trust-backing"):
        assert disk.read_bytes()[:13] == b"root's secret"


def test_info_shows_where_each_backing_name_points(public_dir: Path) -> None:
    hidden = secret(public_dir)
    (public_dir / "innocent.raw").symlink_to(hidden)
    top = user_image(public_dir, "innocent.raw")
    proc = cli("info", "--backing-chain", top)
    assert proc.returncode == 0, proc.stderr
    assert f"backing file: innocent.raw (actual path: {hidden})" in proc.stdout
