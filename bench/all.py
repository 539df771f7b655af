"""Every benchmark in one command, side by side with QEMU in the same run; rewrites BENCHMARKS.md.

Runs the scripts of bench/ one after the other, each against its QEMU
reference on the same data (qemu-storage-daemon, qemu-img), each writing its
own section of the Markdown file between its markers (hand-written sections
stay as they are):

- run.py: fio through the mount (not pinned; pinned to one CPU; pinned with
  top.qcow2 fully allocated, the write jobs), against qsd and a bare pyfuse3
  passthrough;
- jobs.py: stream and commit against qemu-img rebase/commit, and the stall a
  reader sees;
- active.py: active commit and live snapshot under fio, against qsd;
- offline.py: check of written 1 TiB and 16 TiB images and the start-up of
  info, check and commit, against qemu-img;
- depth.py: map --output json of a 4 GiB chain and a 2000-layer chain's
  map, check, compare, stream and commit, against qemu-img;
- scale.py: 4 KiB reads through 256 layers against one layer, and the
  daemon's peak memory on 1 TiB, 16 TiB and deep chains against qsd.

`--quick` runs the unpinned fio jobs, the jobs and the extra steps on a
small chain with one short repetition, in under 2 minutes here, for checking a change: its tables go to a scratch
file (printed at the end), never into BENCHMARKS.md. Not a test.

    .venv/bin/python bench/all.py [--quick] [--out BENCHMARKS.md] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Step:
    name: str
    script: str
    full: tuple[str, ...]
    quick: tuple[str, ...] | None  # None: not part of --quick


STEPS = [
    Step("fio", "run.py", ("--runtime", "8", "--ramp", "1", "--repeat", "3"),
         ("--runtime", "2", "--ramp", "0", "--size", "256M", "--jobs", "randread qd1 psync,randwrite qd16")),
    Step("fio-pinned", "run.py", ("--runtime", "8", "--ramp", "1", "--repeat", "3", "--pin", "0"), None),
    Step("fio-pinned-allocated", "run.py",
         ("--runtime", "8", "--ramp", "1", "--repeat", "3", "--pin", "0", "--top-allocated", "--jobs", "randwrite"),
         None),
    Step("jobs", "jobs.py", ("--repeat", "3"), ("--size", "64M", "--repeat", "1", "--no-verify")),
    Step("active", "active.py", ("--repeat", "3"),
         ("--size", "128M", "--repeat", "1", "--depths", "16", "--no-verify")),
]

# The scale-and-speed benchmarks (issue 11), with their own flags.
EXTRA_STEPS = [
    Step("offline", "offline.py", (),
         ("--sizes", "1 TiB", "--writes", "2000", "--repeat", "1", "--startup-repeat", "5")),
    Step("map-depth", "depth.py", (), ("--quick", "--depth", "0")),
    Step("deep", "scale.py", ("deep", "--layers", "256", "--pin", "0", "--repeat", "3", "--runtime", "8", "--ramp", "2"),
         None),
    Step("memory", "scale.py", ("memory", "--huge", "1T,16T", "--runtime", "20", "--repeat", "1"),
         ("memory", "--huge", "1T", "--layers", "16", "--cache-sizes", "", "--runtime", "2", "--ramp", "0",
          "--repeat", "1")),
]


def plan(only: str | None, quick: bool) -> list[Step]:
    steps = [s for s in STEPS + EXTRA_STEPS
             if (BENCH / s.script).exists() and (s.quick is not None or not quick)]
    if only:
        wanted = only.split(",")
        unknown = [w for w in wanted if w not in {s.name for s in steps}]
        if unknown:
            sys.exit(f"bench/all.py: unknown step(s) {', '.join(unknown)}; "
                     f"the steps are {', '.join(s.name for s in steps)}")
        steps = [s for s in steps if s.name in wanted]
    return steps


def run_step(step: Step, quick: bool, out: Path) -> tuple[float, int]:
    flags = step.quick if quick and step.quick is not None else step.full
    argv = [sys.executable, str(BENCH / step.script), *flags, "--out", str(out)]
    print(f"== {step.name}: {' '.join(argv[1:])}", flush=True)
    t0 = time.monotonic()
    rc = subprocess.run(argv, cwd=BENCH.parent).returncode
    return time.monotonic() - t0, rc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small chain, one short repetition (under 2 min); "
                                                         "results printed, BENCHMARKS.md left alone")
    p.add_argument("--out", type=Path, help="the Markdown file to rewrite (default: BENCHMARKS.md, "
                                            "or a scratch file with --quick)")
    p.add_argument("--only", help="comma-separated step names to run (default: all)")
    args = p.parse_args()
    steps = plan(args.only, args.quick)
    out = args.out or (Path(tempfile.mkstemp(prefix="imgchain-bench-", suffix=".md")[1]) if args.quick
                       else BENCH.parent / "BENCHMARKS.md")
    results = [(step, *run_step(step, args.quick, out)) for step in steps]
    print(f"\n== summary ({'quick' if args.quick else 'full'}; tables in {out})")
    for step, seconds, rc in results:
        print(f"{step.name:22} {seconds:7.1f} s  {'ok' if rc == 0 else f'FAILED (exit {rc})'}")
    if args.quick:
        print(out.read_text())
    if any(rc for _, _, rc in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
