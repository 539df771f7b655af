"""The qcow2 mutation fuzzer (tests/fuzz_qcow2.py) as part of the suite: 500 cases.

It runs in a child process under an address-space limit and a per-case alarm,
so a hang or unbounded memory shows as a failing case rather than a stuck
suite. Any number of cases: `python -m tests.fuzz_qcow2 --cases N` (README).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_500_mutated_images_fail_cleanly_or_behave(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "tests.fuzz_qcow2", "--cases", "500", "--seed", "1",
                           "--work", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "500 cases, 0 failed" in proc.stderr
