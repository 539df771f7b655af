"""The offline commands through the real console script: output, exit codes, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import imgchain

from .conftest import assert_qemu_clean, qemu_img, qemu_io

IMGCHAIN = str(Path(sys.executable).with_name("imgchain"))


def cli(*args: str | os.PathLike[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IMGCHAIN, *map(str, args)], capture_output=True, text=True, cwd=cwd)


def one_line_error(proc: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imgchain: error: "), proc.stderr
    return lines[0]


def test_create_records_detected_backing_format(tmp_path: Path) -> None:
    assert cli("create", "-f", "raw", "base.raw", "1M", cwd=tmp_path).returncode == 0
    proc = cli("create", "-b", "base.raw", "top.qcow2", cwd=tmp_path)
    assert proc.returncode == 0
    assert "backing_file=base.raw backing_fmt=raw" in proc.stdout
    info = json.loads(qemu_img("info", "--output=json", tmp_path / "top.qcow2").stdout)
    assert info["backing-filename-format"] == "raw"
    assert info["virtual-size"] == 1 << 20
    assert_qemu_clean(tmp_path / "top.qcow2")


@pytest.mark.parametrize("size, expected", [("64M", 64 << 20), ("1G", 1 << 30), ("4096", 4096), ("2k", 2048)])
def test_create_sizes(tmp_path: Path, size: str, expected: int) -> None:
    assert cli("create", "-o", "cluster_size=4K", tmp_path / "a.qcow2", size).returncode == 0
    info = json.loads(qemu_img("info", "--output=json", tmp_path / "a.qcow2").stdout)
    assert (info["virtual-size"], info["cluster-size"]) == (expected, 4096)
    assert_qemu_clean(tmp_path / "a.qcow2")


def test_create_matches_qemu_layout(tmp_path: Path) -> None:
    """Same bytes as qemu-img create for a fresh image with a backing file."""
    qemu_img("create", "-f", "qcow2", tmp_path / "b.qcow2", "64M", check=True)
    qemu_img("create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", tmp_path / "q.qcow2", check=True)
    assert cli("create", "-b", "b.qcow2", "-F", "qcow2", tmp_path / "i.qcow2").returncode == 0
    assert (tmp_path / "i.qcow2").read_bytes() == (tmp_path / "q.qcow2").read_bytes()


@pytest.mark.parametrize("args, code", [
    (("create", "x.qcow2", "12Q"), 2),
    (("create", "-o", "preallocation=full", "x.qcow2", "1M"), 2),
    (("create", "-f", "vmdk", "x.qcow2", "1M"), 2),
    (("rebase", "x.qcow2"), 2),
    (("check", "-r", "some", "x.qcow2"), 2),
    (("nosuchcommand",), 2),
])
def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...], code: int) -> None:
    proc = cli(*args, cwd=tmp_path)
    assert proc.returncode == code and "Traceback" not in proc.stderr


def test_create_size_not_sector_multiple(tmp_path: Path) -> None:
    line = one_line_error(cli("create", tmp_path / "x.qcow2", "1000"))
    assert "multiple of 512" in line


def test_create_with_missing_backing(tmp_path: Path) -> None:
    line = one_line_error(cli("create", "-b", "nothere.qcow2", "top.qcow2", cwd=tmp_path))
    assert "nothere.qcow2" in line
    assert not (tmp_path / "top.qcow2").exists()


@pytest.mark.parametrize("command", [["info"], ["check"], ["map"], ["rebase", "-u", "-b", "x"]])
def test_missing_file_is_one_line(tmp_path: Path, command: list[str]) -> None:
    line = one_line_error(cli(*command, tmp_path / "nothere.qcow2"))
    assert "nothere.qcow2" in line and "No such file or directory" in line


@pytest.mark.parametrize("command", [["info"], ["check"], ["map"], ["compare", "OTHER"],
                                     ["rebase", "-b", "", "-F", "raw"]])
def test_corrupt_image_is_one_line(tmp_path: Path, command: list[str]) -> None:
    bad = tmp_path / "bad.qcow2"
    imgchain.create.create_image(str(bad), "qcow2", 1 << 20)
    with open(bad, "r+b") as f:
        f.seek(20)
        f.write((30).to_bytes(4, "big"))
    other = tmp_path / "other.raw"
    other.write_bytes(bytes(1 << 20))
    argv = [str(other) if a == "OTHER" else a for a in command]
    code = 2 if command[0] == "compare" else 1
    line = one_line_error(cli(*argv[:1], *argv[1:], bad), code)
    assert "Unsupported cluster size: 2^30" in line and str(bad) in line


def test_compare_exit_codes(chain3: Path) -> None:
    tmp = chain3.parent
    model = bytearray(b"\xaa" * (1 << 20) + bytes(3 << 20))
    (tmp / "model.raw").write_bytes(model)
    proc = cli("compare", chain3, tmp / "model.raw")
    assert (proc.returncode, proc.stdout.strip()) == (0, "Images are identical.")
    with imgchain.open_chain(chain3, writable=True) as chain:
        chain.write(3_000_000, b"\x01")
    proc = cli("compare", chain3, tmp / "model.raw")
    assert proc.returncode == 1
    assert proc.stdout.strip() == qemu_img("compare", chain3, tmp / "model.raw").stdout.strip()
    (tmp / "longer.raw").write_bytes(model + bytes(512))
    with imgchain.open_chain(chain3, writable=True) as chain:
        chain.write(3_000_000, b"\0")
    assert cli("compare", chain3, tmp / "longer.raw").returncode == 0
    proc = cli("compare", "-s", chain3, tmp / "longer.raw")
    assert proc.returncode == 1 and "Image size mismatch" in proc.stdout
    assert cli("compare", chain3, tmp / "nothere.raw").returncode == 2


def _fill(chain_path: Path) -> None:
    with imgchain.open_chain(chain_path.parent / "mid.qcow2", writable=True) as mid:
        mid.write(100_000, b"\x11" * 200_000)
        mid.write_zeroes(0, 65536)
    with imgchain.open_chain(chain_path, writable=True) as top:
        top.write(150_000, b"\x22" * 10_000)


def test_safe_rebase_keeps_content_like_qemu(chain3: Path) -> None:
    tmp = chain3.parent
    _fill(chain3)
    qemu_img("convert", "-O", "raw", chain3, tmp / "before.raw", check=True)
    proc = cli("rebase", "-b", "base.raw", "-F", "raw", chain3)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(qemu_img("info", "--output=json", chain3).stdout)
    assert (info["backing-filename"], info["backing-filename-format"]) == ("base.raw", "raw")
    assert qemu_img("compare", chain3, tmp / "before.raw").returncode == 0
    assert_qemu_clean(chain3)


def test_safe_rebase_to_no_backing(chain3: Path) -> None:
    tmp = chain3.parent
    _fill(chain3)
    qemu_img("convert", "-O", "raw", chain3, tmp / "before.raw", check=True)
    assert cli("rebase", "-b", "", chain3).returncode == 0
    info = json.loads(qemu_img("info", "--output=json", chain3).stdout)
    assert "backing-filename" not in info
    assert qemu_img("compare", chain3, tmp / "before.raw").returncode == 0
    assert_qemu_clean(chain3)


def test_unsafe_rebase_changes_header_only(chain3: Path) -> None:
    tmp = chain3.parent
    before = chain3.read_bytes()
    assert cli("rebase", "-u", "-b", "base.raw", "-F", "raw", chain3).returncode == 0
    after = chain3.read_bytes()
    cs = 65536
    assert after[cs:] == before[cs:] or len(after) == len(before)
    reference = tmp / "ref.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "mid.qcow2", "-F", "qcow2",
             reference, "4M", check=True)
    qemu_img("rebase", "-u", "-b", "base.raw", "-F", "raw", reference, check=True)
    assert after[:4096] == reference.read_bytes()[:4096]  # cluster 0 byte-identical to qemu's
    assert cli("rebase", "-u", "-b", "nothere.qcow2", chain3).returncode == 1  # format needed


def test_rebase_name_too_long_changes_nothing(tmp_path: Path) -> None:
    top = tmp_path / "t.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", top, "1M", check=True)
    before = top.read_bytes()
    line = one_line_error(cli("rebase", "-u", "-b", "n" * 420, "-F", "raw", top))
    assert "No space left in the file header" in line
    assert top.read_bytes() == before
    line = one_line_error(cli("rebase", "-u", "-b", "n" * 1100, "-F", "raw", tmp_path / "none.qcow2"))


def test_qemu_reads_after_cli_rebase(chain3: Path) -> None:
    _fill(chain3)
    assert cli("rebase", "-b", "base.raw", chain3).returncode == 0
    proc = qemu_io(chain3, "read -P 0x22 150000 10000", "read -P 0x11 160000 140000", "read -P 0 0 65536")
    assert proc.returncode == 0 and "Pattern verification failed" not in proc.stdout
