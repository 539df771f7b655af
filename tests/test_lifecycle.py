"""The mount's life as users meet it: any directory, failed starts, dead daemons, the runtime directory."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgchain.runtime import record_path

from .conftest import REPO, qemu_io
from .mounting import IMGCHAIN, cli, is_mountpoint, mounted_pid, require_fuse

PACKAGE_FILES = ("pyproject.toml", "README.md", "imgchain", "formats", "fuse", "cli")


def dependency_dirs() -> set[str]:
    """Where this interpreter finds the project's dependencies (site-packages folders)."""
    dirs = set()
    for name in ("pyfuse3", "trio", "construct", "click"):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, name
        origin = Path(spec.origin)
        dirs.add(str(origin.parent.parent if spec.submodule_search_locations else origin.parent))
    return dirs


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
    Path(site, "imgchain-test-deps.pth").write_text("".join(f"{d}\n" for d in dependency_dirs()))
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                           "--ignore-installed", source],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    where = subprocess.run([python, "-c", "import imgchain.fuse.daemon as d; print(d.__file__)"],
                           capture_output=True, text=True, cwd=root)
    assert where.stdout.startswith(site), where.stdout + where.stderr  # the installed copy, not the clone
    return venv / "bin"


# -- 1. any current directory --------------------------------------------------

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


# -- 2. a failed start says why ------------------------------------------------

def test_no_fuse_device_names_libfuse_reason(chain3: Path) -> None:
    """Without /dev/fuse (a private mount namespace hides it), the error is libfuse's own words."""
    disk = chain3.parent / "disk.img"
    script = f'mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3 && exec "$@"'
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", IMGCHAIN, "mount", chain3, disk],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"imgchain: error: {disk}: cannot mount: fuse: device not found")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not disk.exists()


def test_daemon_crash_at_start_up_names_the_exception(chain3: Path, tmp_path: Path) -> None:
    """A daemon that dies before it can report (a broken pyfuse3) is explained from its log."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pyfuse3.py").write_text('raise ImportError("libfuse3.so.3: cannot open shared object file")\n')
    env = {**os.environ, "PYTHONPATH": str(broken)}
    proc = cli("mount", chain3, chain3.parent / "disk.img", env=env)
    assert proc.returncode == 1
    assert "the daemon exited during start-up: ImportError: libfuse3.so.3: cannot open shared object file" \
        in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# -- 3. recovery after the daemon dies ----------------------------------------

def wait_dead(mountpoint: Path, timeout: float = 30) -> None:
    """Wait until the mount's FUSE connection is gone (statfs fails with ENOTCONN or ECONNABORTED)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.statvfs(mountpoint)
        except OSError as exc:
            assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED), exc
            return
        time.sleep(0.02)
    raise AssertionError(f"{mountpoint} still answers after {timeout} s")


def kill_9(chain3: Path, disk: Path) -> int:
    """Mount in the background and kill the daemon with SIGKILL; returns its pid."""
    require_fuse()
    proc = cli("mount", chain3, disk)
    assert proc.returncode == 0, proc.stderr
    pid = mounted_pid(disk)
    os.kill(pid, signal.SIGKILL)
    wait_dead(disk)
    return pid


def states(disk: Path) -> list[str]:
    docs = json.loads(cli("mounts", "--output", "json").stdout)
    return [d["state"] for d in docs if d["mountpoint"] == str(disk.resolve())]


def assert_recovered(chain3: Path, disk: Path) -> None:
    assert not is_mountpoint(disk)
    assert states(disk) == []
    assert not disk.exists()  # the dead daemon had created it
    assert qemu_io(chain3, "write 0 512").returncode == 0  # its locks went with it


def test_unmount_detaches_a_dead_mount(chain3: Path) -> None:
    disk = chain3.parent / "disk.img"
    pid = kill_9(chain3, disk)
    assert states(disk) == ["dead"]
    proc = cli("unmount", disk)
    assert proc.returncode == 0, proc.stderr
    assert f"the daemon (pid {pid}) had died; detached the dead mount" in proc.stderr
    assert "check -r leaks" in proc.stderr
    assert_recovered(chain3, disk)


def test_mount_onto_a_dead_mount_cleans_it_up(chain3: Path) -> None:
    disk = chain3.parent / "disk.img"
    pid = kill_9(chain3, disk)
    proc = cli("mount", chain3, disk)
    assert proc.returncode == 0, proc.stderr
    assert f"cleaned up a dead mount: its daemon (pid {pid}) had died" in proc.stderr
    try:
        assert states(disk) == ["running"]
        with open(disk, "rb") as f:
            assert f.read(4) == b"\xaa" * 4
    finally:
        done = cli("unmount", disk)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert_recovered(chain3, disk)


def wait_zombie(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return
        time.sleep(0.02)
    raise AssertionError(f"{pid} is not a zombie after {timeout} s")


def test_a_zombie_daemon_is_dead(chain3: Path) -> None:
    """A daemon killed but not yet reaped by its parent (here: this test) counts as dead."""
    require_fuse()
    disk = chain3.parent / "disk.img"
    proc = subprocess.Popen([IMGCHAIN, "mount", "-f", chain3, disk], stdout=subprocess.PIPE, text=True)
    try:
        assert "mounted" in proc.stdout.readline()
        os.kill(proc.pid, signal.SIGKILL)
        wait_dead(disk)
        wait_zombie(proc.pid)
        assert states(disk) == ["dead"]
        done = cli("unmount", disk)
        assert done.returncode == 0, done.stderr
        assert f"the daemon (pid {proc.pid}) had died" in done.stderr
        assert_recovered(chain3, disk)
    finally:
        proc.kill()
        proc.wait()


# -- 4. never signal or delete the wrong thing ---------------------------------

def test_unmount_never_signals_a_reused_pid(chain3: Path) -> None:
    """The dead daemon's pid now belongs to an unrelated process: it must get no signal."""
    disk = chain3.parent / "disk.img"
    pid = kill_9(chain3, disk)
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        old = Path(record_path(pid))
        record = json.loads(old.read_text())
        record["pid"] = bystander.pid  # as if the kernel had given the pid to `sleep`
        Path(record_path(bystander.pid)).write_text(json.dumps(record))
        old.unlink()
        proc = cli("unmount", disk)
        time.sleep(0.2)
        assert bystander.poll() is None, "the bystander was signalled"
        assert proc.returncode == 0, proc.stderr
        assert f"the daemon (pid {bystander.pid}) had died" in proc.stderr
        assert_recovered(chain3, disk)
    finally:
        bystander.kill()
        bystander.wait()


def private_env(directory: Path) -> dict[str, str]:
    return {**os.environ, "IMGCHAIN_RUNTIME_DIR": str(directory)}


@pytest.mark.parametrize("how, problem", [
    ("mode", "has mode 0755, not 0700"),
    ("owner", "is owned by uid 65534, not 0"),
    ("symlink", "is a symbolic link"),
])
def test_runtime_dir_must_be_private(chain3: Path, tmp_path: Path, how: str, problem: str) -> None:
    """A runtime directory someone else could have prepared is refused, before anything is written."""
    directory = tmp_path / "runtime"
    if how == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        directory.symlink_to(tmp_path / "elsewhere")
    else:
        directory.mkdir(mode=0o700)
        os.chmod(directory, 0o755) if how == "mode" else os.chown(directory, 65534, 65534)
    for args in (("mounts",), ("mount", chain3, chain3.parent / "disk.img"), ("unmount", chain3)):
        proc = cli(*args, env=private_env(directory))
        assert proc.returncode == 1, (args, proc.stderr)
        assert proc.stderr == f"imgchain: error: {directory}: refusing this runtime directory: it {problem} " \
                              "(remove it, or set IMGCHAIN_RUNTIME_DIR to a private directory)\n"
    assert not (chain3.parent / "disk.img").exists()
    assert not list((tmp_path / "elsewhere").iterdir()) if how == "symlink" else True


def test_a_dead_record_deletes_only_its_own_socket(tmp_path: Path) -> None:
    """Cleaning a stale record deletes its socket only if it is a socket in the runtime directory."""
    directory = tmp_path / "runtime"
    directory.mkdir(mode=0o700)
    gone = subprocess.Popen(["true"])
    gone.wait()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    inside = directory / "not-a-socket.qmp"
    inside.write_text("also precious")
    for n, socket in enumerate((victim, inside)):
        record = {"pid": gone.pid + 100000 * (n + 1), "mountpoint": "/nowhere", "image": "/x",
                  "socket": str(socket)}
        (directory / f"mount-{record['pid']}.json").write_text(json.dumps(record))
    proc = cli("mounts", "--output", "json", env=private_env(directory))
    assert proc.returncode == 0 and json.loads(proc.stdout) == []
    assert victim.read_text() == "precious" and inside.read_text() == "also precious"
    assert not list(directory.glob("mount-*.json"))  # the stale records themselves are gone


def test_logs_and_records_never_follow_symlinks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imgchain import runtime
    directory = tmp_path / "runtime"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv("IMGCHAIN_RUNTIME_DIR", str(directory))
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (directory / "starting-1.log").symlink_to(victim)
    with pytest.raises(OSError) as raised:
        runtime.create_log("starting-1.log")
    assert raised.value.errno == errno.ELOOP
    record = runtime.MountRecord.for_this_process(mountpoint="/m", image="/i", socket="/s")
    (directory / f"mount-{os.getpid()}.json").symlink_to(victim)
    assert runtime.records() == []  # a symlink is not read as a record
    (directory / f"mount-{os.getpid()}.json.tmp").symlink_to(victim)
    runtime.write_record(record)
    assert victim.read_text() == "precious"
    assert runtime.records() == [record]


# -- 6. max_background really raised -------------------------------------------

def test_max_background_raised_with_fusectl_mounted_first(chain3: Path) -> None:
    """In a mount namespace of its own where fusectl is not mounted (as on these machines
    at boot), the root daemon mounts fusectl, raises max_background to 64, logs it, and
    `mounts --output json` shows the effective value."""
    require_fuse()
    assert os.geteuid() == 0, "this test runs as root (make test does)"
    disk = chain3.parent / "disk.img"
    script = ('umount /sys/fs/fuse/connections 2>/dev/null; '
              'grep -q " - fusectl " /proc/self/mountinfo && exit 9; '
              '"$0" mount "$1" "$2" >/dev/null || exit 1; '
              '"$0" mounts --output json; s=$?; "$0" unmount "$2"; exit $s')
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, IMGCHAIN, chain3, disk],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [doc] = [d for d in json.loads(proc.stdout) if d["mountpoint"] == str(disk.resolve())]
    assert doc["max-background"] == 64
    log = (Path(os.environ["IMGCHAIN_RUNTIME_DIR"]) / f"mount-{doc['pid']}.log").read_text()
    assert "fusectl was not mounted: mounted it on /sys/fs/fuse/connections" in log
    assert "max_background is 64" in log
