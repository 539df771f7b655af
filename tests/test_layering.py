"""The import direction of DESIGN.md: cli -> fuse -> imgchain -> formats, never back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BANNED = {
    "formats": ("trio", "pyfuse3", "click", "imgchain"),
    "imgchain": ("pyfuse3", "click", "imgchain.fuse", "imgchain.cli"),
    "fuse": ("click", "imgchain.cli"),
}


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("folder", sorted(BANNED))
def test_imports_point_one_way(folder: str) -> None:
    bad = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for line, name in imports(path):
            for banned in BANNED[folder]:
                if name == banned or name.startswith(banned + "."):
                    if folder == "formats" and name.startswith("imgchain.formats"):
                        continue
                    bad.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_layering_check_sees_files() -> None:
    assert list((REPO / "formats").rglob("*.py")) and list((REPO / "imgchain").rglob("*.py"))
