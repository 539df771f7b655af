"""A few rounds of the job stress (tests/stress_jobs.py) in the suite; any number with
`python -m tests.stress_jobs --rounds N`."""

from __future__ import annotations

from pathlib import Path

import pytest

from .stress_jobs import run_round


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_job_mix_on_a_random_chain(tmp_path: Path, seed: int) -> None:
    failures, done = run_round(seed, tmp_path)
    assert failures == [], (failures, done)
    assert any(not d.endswith("refused") for d in done), done  # something really ran
