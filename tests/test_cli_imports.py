"""The command line's modules import one way: entry -> main -> images, mount, jobs -> common; snapshot -> jobs.

And a command loads only what it needs: the offline tools neither pyfuse3 nor
the job engine (trio), an offline commit not pyfuse3.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imgchain.cli.main import COMMAND_MODULES, main

from .conftest import qemu_img, qemu_io

CLI = Path(__file__).resolve().parent.parent / "cli"


def sibling_imports(path: Path) -> set[str]:
    """The cli modules `path` imports with a relative import."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
    return found


def test_command_modules_do_not_import_main() -> None:
    for name in ("images.py", "mount.py", "snapshot.py", "common.py"):
        assert "main" not in sibling_imports(CLI / name), name


def test_only_python_m_imports_the_executables_entry() -> None:
    """cli/entry.py changes its own process (deferred modules, no teardown): no module imports it
    but `python -m imgchain.cli`'s."""
    for path in CLI.glob("*.py"):
        assert path.name == "__main__.py" or "entry" not in sibling_imports(path), path.name


def test_common_imports_no_command_module() -> None:
    assert not sibling_imports(CLI / "common.py")


def test_jobs_does_not_import_snapshot() -> None:
    """cli/snapshot.py uses cli/jobs.py's mount lookup; never the other way round."""
    assert "snapshot" not in sibling_imports(CLI / "jobs.py")


# -- what a command loads ------------------------------------------------------------

# Run one command in a fresh interpreter, then print the names of the modules it loaded.
PROBE = """
import sys
from imgchain.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("\\nMODULES " + " ".join(sorted(sys.modules)))
"""
# What only a mount or a job engine needs; an offline tool must not pay for importing them.
MOUNT_AND_JOBS = {"pyfuse3", "trio", "imgchain.jobs", "imgchain.daemon", "imgchain.qmp", "imgchain.fuse.daemon",
                  "imgchain.cli.jobs", "imgchain.cli.mount", "imgchain.cli.snapshot"}


def loaded_by(*args: str | Path) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True)
    last = proc.stdout.rstrip("\n").rsplit("\n", 1)[-1]
    assert last.startswith("MODULES "), proc.stdout + proc.stderr
    return set(last.split()[1:])


@pytest.fixture
def overlay(tmp_path: Path) -> Path:
    """base.qcow2 (data at 0) <- top.qcow2 (data at 1 MiB), made by qemu-img and qemu-io."""
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "4M", check=True)
    qemu_io(tmp_path / "base.qcow2", "write -P 1 0 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", tmp_path / "top.qcow2", check=True)
    qemu_io(tmp_path / "top.qcow2", "write -P 2 1M 64k")
    return tmp_path / "top.qcow2"


def test_offline_tools_load_neither_fuse_nor_the_job_engine(overlay: Path) -> None:
    base = overlay.with_name("base.qcow2")
    commands = [("create", "-q", overlay.with_name("new.qcow2"), "1M"), ("info", overlay),
                ("info", "--output", "json", "--backing-chain", overlay), ("check", overlay),
                ("check", "--output", "json", overlay), ("map", overlay), ("compare", overlay, base),
                ("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", overlay)]
    for args in commands:
        modules = loaded_by(*args)
        assert "imgchain.cli.images" in modules, args
        assert not modules & MOUNT_AND_JOBS, (args, modules & MOUNT_AND_JOBS)


def test_offline_jobs_run_the_job_engine_without_trio_or_fuse(overlay: Path) -> None:
    """The same engine on the synchronous loop: trio's import would cost a small commit a fifth of its time."""
    modules = loaded_by("commit", "-q", overlay)
    assert {"imgchain.jobs.offline", "imgchain.jobs.commit"} <= modules  # it did run the job in-process
    assert not modules & {"trio", "pyfuse3", "imgchain.fuse.daemon", "imgchain.cli.mount", "imgchain.cli.images"}
    assert qemu_img("map", "--output=json", overlay.with_name("base.qcow2")).stdout.count('"data": true') == 2
    modules = loaded_by("stream", "-q", overlay)
    assert "imgchain.jobs.stream" in modules and not modules & {"trio", "pyfuse3"}
    assert "backing-filename" not in qemu_img("info", "--output=json", overlay).stdout  # streamed whole


def test_every_command_is_named_in_the_lazy_table() -> None:
    """cli/main.py's table of which module holds which command is the commands' real home."""
    for module in COMMAND_MODULES:
        importlib.import_module(module, "imgchain.cli")
    assert set(main.commands) == set(main.lazy)
    for name, command in main.commands.items():
        assert command.callback is not None
        assert command.callback.__module__ == "imgchain.cli" + main.lazy[name], name


def test_info_and_check_load_only_what_the_image_needs(overlay: Path) -> None:
    """Start-up is most of a small `info` or `check`: an image with neither internal snapshots nor
    bitmaps loads neither decoder, and no other command's core module (nor json, for human output);
    one with a snapshot does."""
    others = {"imgchain.formats.qcow2_snapshots", "imgchain.formats.qcow2_bitmaps", "imgchain.compare",
              "imgchain.map", "imgchain.create", "imgchain.rebase", "imgchain.check", "json"}
    assert not loaded_by("info", overlay) & others
    assert loaded_by("check", overlay) & others == {"imgchain.check"}
    qemu_img("snapshot", "-c", "snap1", overlay, check=True)
    assert "imgchain.formats.qcow2_snapshots" in loaded_by("info", overlay)
    assert "imgchain.formats.qcow2_snapshots" in loaded_by("check", overlay)


def test_start_up_loads_no_import_hook_nor_pathlib(overlay: Path) -> None:
    """The development install is a plain path entry (the Makefile's setuptools compat mode), and
    nothing on the info/check path imports pathlib: setuptools' default editable import hook loaded
    pathlib and what it imports (urllib.parse, ipaddress, ...) into every process, about 12 ms."""
    for args in (("info", overlay), ("check", overlay)):
        modules = loaded_by(*args)
        assert not {m for m in modules if m.startswith("__editable__")}, args
        assert "pathlib" not in modules, args


# -- the executable's own start and end (cli/entry.py) -----------------------------------

IMGCHAIN = str(Path(sys.executable).with_name("imgchain"))


def executed_modules(*args: str | Path) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the real `imgchain` executable; the modules whose code ran (Python's import-time report)."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run([IMGCHAIN, *map(str, args)], capture_output=True, text=True, env=env)
    ran = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return proc, ran - {"imported package"}


def test_the_executable_defers_what_click_and_construct_import_but_never_use(overlay: Path) -> None:
    """pdb, pickle, hashlib and traceback (with OpenSSL and the debugger's own imports): a fifth of
    a small `info`'s start-up. The command still runs them through, on a real image."""
    for args in (("info", overlay), ("check", overlay), ("map", "--output", "json", overlay)):
        proc, ran = executed_modules(*args)
        assert proc.returncode == 0, proc.stderr
        assert {"construct", "click", f"imgchain.{args[0]}"} <= ran, args
        assert not ran & {"pdb", "bdb", "pickle", "hashlib", "_hashlib", "traceback"}, (args, ran)
    assert "virtual size: 4 MiB" in executed_modules("info", overlay)[0].stdout


DEFERRED_IN_USE = """
import sys
from imgchain.cli.entry import DeferredModule, defer_modules
defer_modules()
import construct, hashlib, pickle
assert isinstance(sys.modules["hashlib"], DeferredModule)
checked = construct.Checksum(construct.Bytes(32), lambda data: hashlib.sha256(data).digest(), lambda ctx: b"x" * 4)
assert checked.build(None) == hashlib.sha256(b"xxxx").digest()
from pickle import dumps, loads
assert loads(dumps({"a": [1, 2]})) == {"a": [1, 2]}
import traceback, pdb
try:
    1 / 0
except ZeroDivisionError:
    assert "ZeroDivisionError" in traceback.format_exc()
assert issubclass(pdb.Pdb, __import__("bdb").Bdb)
assert not any(isinstance(sys.modules[n], DeferredModule) for n in ("hashlib", "pickle", "traceback", "pdb"))
print("deferred modules work")
"""


def test_a_deferred_module_is_the_real_one_once_used() -> None:
    proc = subprocess.run([sys.executable, "-c", DEFERRED_IN_USE], capture_output=True, text=True)
    assert proc.stdout == "deferred modules work\n", proc.stderr


# The executable's entry, with an exit handler that says whether the interpreter was torn down.
WITH_EXIT_HANDLER = """
import atexit, sys
atexit.register(lambda: print("TORN DOWN", file=sys.stderr))
from imgchain.cli.entry import run
sys.argv[0] = "imgchain"
run()
"""


def run_with_exit_handler(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WITH_EXIT_HANDLER, *map(str, args)], capture_output=True,
                          text=True)


def test_a_read_only_command_ends_without_teardown_and_keeps_its_output_and_code(tmp_path: Path) -> None:
    """info, check, map and compare end with os._exit once done; their output (here over 300 KiB
    through a pipe) and exit codes are whole. A command that writes tears down as ever."""
    image = tmp_path / "fragmented.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1G", check=True)
    # Clusters written from the end backwards: no two extents merge in `map`.
    qemu_io(image, *(f"write -P {i % 200 + 1} {i * 128}k 64k" for i in range(4000, -1, -1)))
    proc = run_with_exit_handler("map", "--output", "json", image)
    assert proc.returncode == 0 and "TORN DOWN" not in proc.stderr, proc.stderr
    assert len(proc.stdout) > 300 << 10
    assert proc.stdout == qemu_img("map", "--output=json", image).stdout
    proc = run_with_exit_handler("compare", image, tmp_path / "missing.qcow2")
    assert proc.returncode == 2 and "TORN DOWN" not in proc.stderr
    assert proc.stderr.startswith("imgchain: error: ") and "missing.qcow2" in proc.stderr
    proc = run_with_exit_handler("create", "-q", "-f", "qcow2", tmp_path / "new.qcow2", "1M")
    assert proc.returncode == 0 and "TORN DOWN" in proc.stderr, proc.stderr
    assert "TORN DOWN" in run_with_exit_handler("--version").stderr
