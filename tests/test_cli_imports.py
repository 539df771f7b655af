"""The command line's modules import one way: main -> images, mount, jobs -> common; snapshot -> jobs."""

from __future__ import annotations

import ast
from pathlib import Path

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


def test_common_imports_no_command_module() -> None:
    assert not sibling_imports(CLI / "common.py")


def test_jobs_does_not_import_snapshot() -> None:
    """cli/snapshot.py uses cli/jobs.py's mount lookup; never the other way round."""
    assert "snapshot" not in sibling_imports(CLI / "jobs.py")
