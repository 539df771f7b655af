"""Offline tools against qemu-img: `check` of written TiB images, and start-up of info, check and commit.

Builds, in a temporary directory, qcow2 images of 1 TiB and 16 TiB virtual
size (64 KiB clusters) written by qemu-io with --writes random 4 KiB writes
(seeded; `-t unsafe`, so about 10-30 s per image), and a small image and a
small two-layer chain. Checks first that `imgchain check` prints what
`qemu-img check` prints (human and JSON, same exit code), then times whole
processes, imgchain and qemu-img alternating, --repeat times:

- check: `imgchain check IMG` against `qemu-img check IMG` on each large image;
- start-up: `imgchain info` and `imgchain check` of the small image against
  qemu-img's, and `imgchain commit top.qcow2` (offline, the in-process job)
  against `qemu-img commit` on a fresh copy of the chain each run; and the
  floors under every imgchain figure: the interpreter alone (`python -c pass`)
  and the interpreter importing construct and click, which every command loads.
  These run the development install (`make setup`: editable, a plain .pth
  path entry), and again, for info and check, a normal install: the project
  built by pip into a fresh virtual environment that takes the dependencies
  from .venv through a .pth line.

Figures are medians of wall-clock and CPU (user + sys) seconds; ratios are
imgchain / qemu-img, computed run by run and then the median (min-max).
Prints a Markdown table; with --out, also puts it in its own section of
BENCHMARKS.md. Not a test.

    .venv/bin/python bench/offline.py [--writes 20000] [--repeat 5] [--startup-repeat 15] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jobs import loadavg, write_out  # noqa: E402
from run import IMGCHAIN, log, machine_line, run, short_path  # noqa: E402

MARK = "<!-- bench/offline.py: {} {} -->"  # begin/end, section
SECTION = "Offline tools: check of written TiB images and start-up, against qemu-img"
SIZES = {"1 TiB": 1 << 40, "16 TiB": 16 << 40}
REPO = Path(__file__).resolve().parent.parent
DEPENDENCIES = ("click", "trio", "pyfuse3", "construct")


@dataclass
class Timing:
    wall: float
    cpu: float


@dataclass
class Pair:
    """One measurement: imgchain's command and qemu-img's, with their runs in pairs."""

    name: str
    ours: list[str]
    theirs: list[str]
    before: Callable[[], None] = lambda: None  # untimed, before every run of either (a fresh copy)
    runs: list[tuple[Timing, Timing]] = field(default_factory=list)


def timed(argv: list[str], cwd: Path) -> Timing:
    """One whole process: wall-clock seconds and its CPU seconds (user + sys)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Timing(wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)


# -- images ---------------------------------------------------------------------

def written_image(path: Path, size: int, writes: int, seed: int) -> Path:
    """A fresh qcow2 image of `size` with `writes` random 4 KiB writes by qemu-io."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(path), str(size)])
    rng = random.Random(seed)
    script = "".join(f"write -P {i % 250 + 1} {rng.randrange(size >> 12) << 12} 4k\n" for i in range(writes))
    start = time.monotonic()
    proc = subprocess.run(["qemu-io", "-t", "unsafe", "-f", "qcow2", str(path)], input=script,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"qemu-io on {path} failed: {proc.stderr.strip()}")
    log(f"{path.name}: {writes} writes in {time.monotonic() - start:.1f} s, {path.stat().st_size >> 20} MiB")
    return path


def small_chain(work: Path) -> None:
    """small.qcow2 (64 MiB, 1 MiB written) and base.qcow2 <- top.qcow2 (64 KiB written in each), as chain/."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(work / "small.qcow2"), "64M"])
    run(["qemu-io", "-c", "write -P 1 0 1M", str(work / "small.qcow2")])
    chain = work / "chain"
    chain.mkdir()
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(chain / "base.qcow2"), "64M"])
    run(["qemu-io", "-c", "write -P 1 0 64k", str(chain / "base.qcow2")])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(chain / "top.qcow2")])
    run(["qemu-io", "-c", "write -P 2 1M 64k", str(chain / "top.qcow2")])


def fresh_chain(work: Path) -> Callable[[], None]:
    def copy() -> None:
        shutil.rmtree(work / "run", ignore_errors=True)
        shutil.copytree(work / "chain", work / "run")
    return copy


def normal_install(work: Path) -> Path:
    """The project installed by pip (not editable) into a new virtual environment whose
    dependencies are .venv's, through a .pth line. Returns its `imgchain` script."""
    venv = work / "installed"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    specs = [importlib.util.find_spec(name) for name in DEPENDENCIES]
    dirs = {str(Path(spec.origin).parent.parent) for spec in specs if spec and spec.origin}
    Path(site, "deps.pth").write_text("".join(f"{d}\n" for d in sorted(dirs)))
    source = work / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info",
                                                                 "build", "demo-work"))
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", str(source)])
    return venv / "bin" / "imgchain"


def same_check_output(image: Path) -> None:
    """imgchain check prints what qemu-img check prints (both outputs) with the same exit code."""
    for output in ("human", "json"):
        ours = subprocess.run([IMGCHAIN, "check", f"--output={output}", image.name], cwd=image.parent,
                              capture_output=True, text=True)
        theirs = subprocess.run(["qemu-img", "check", f"--output={output}", image.name], cwd=image.parent,
                                capture_output=True, text=True)
        if (ours.returncode, ours.stdout) != (theirs.returncode, theirs.stdout):
            raise RuntimeError(f"check of {image.name} ({output}) differs:\nimgchain {ours.returncode}:\n"
                               f"{ours.stdout}{ours.stderr}\nqemu-img {theirs.returncode}:\n{theirs.stdout}")
    summary = json.loads(theirs.stdout)
    log(f"{image.name}: same check output ({summary['allocated-clusters']} clusters allocated)")


# -- measuring ------------------------------------------------------------------

def measure(pair: Pair, work: Path, repeat: int) -> None:
    for _ in range(repeat):
        pair.before()
        ours = timed(pair.ours, work)
        pair.before()
        pair.runs.append((ours, timed(pair.theirs, work)))


def median_of(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}"


def ratio(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


TABLE_HEAD = ("| measurement | imgchain wall s | qemu-img wall s | wall ratio (min-max) | imgchain CPU s | "
              "qemu-img CPU s | CPU ratio (min-max) |\n|---|---|---|---|---|---|---|")


def row(pair: Pair) -> str:
    ours, theirs = [r[0] for r in pair.runs], [r[1] for r in pair.runs]
    wall = [a.wall / b.wall for a, b in pair.runs]
    cpu = [a.cpu / b.cpu if b.cpu else float("inf") for a, b in pair.runs]
    return (f"| {pair.name} | {median_of([t.wall for t in ours])} | {median_of([t.wall for t in theirs])} | "
            f"{ratio(wall)} | {median_of([t.cpu for t in ours])} | {median_of([t.cpu for t in theirs])} | "
            f"{ratio(cpu)} |")


# The floors under every start-up figure: the interpreter, and the interpreter importing the two
# libraries every command loads (construct parses the header, click the command line).
FLOORS = {"the interpreter alone (`python -c pass`)": "pass",
          "the interpreter importing construct and click (`python -c 'import construct, click'`)":
              "import construct, click"}


def floor_row(name: str, runs: list[Timing]) -> str:
    return f"| {name} | {median_of([t.wall for t in runs])} | | | {median_of([t.cpu for t in runs])} | | |"


def report(pairs: list[Pair], floors: dict[str, list[Timing]], args: argparse.Namespace, command: str,
           machine: str, loads: tuple[str, str]) -> str:
    return "\n".join([
        f"### {SECTION}", "",
        f"Measured {machine}. Load average at start {loads[0]}, at end {loads[1]}.", "",
        f"Large images: qcow2, 64 KiB clusters, {args.writes} random 4 KiB writes by qemu-io (seed "
        f"{args.seed}) onto a fresh image. Small: a 64 MiB qcow2 with 1 MiB written; commit: base.qcow2 <- "
        f"top.qcow2 (64 MiB, 64 KiB written in each), a fresh copy for every run of either tool "
        f"(`imgchain commit` runs the commit job in its own process, no mount). `imgchain check` printed "
        f"exactly what `qemu-img check` printed (human and JSON, same exit code) on every image measured. "
        f"Medians of {args.repeat} runs (check) and {args.startup_repeat} runs (start-up), the two tools "
        f"alternating; ratios are imgchain / qemu-img run by run, then the median (min-max).", "",
        TABLE_HEAD, *(row(p) for p in pairs), *(floor_row(n, runs) for n, runs in floors.items()), "",
        "Command:", "", "```sh", command, "```",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--writes", type=int, default=20000, help="random 4 KiB writes per large image (default 20000)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the writes")
    p.add_argument("--repeat", type=int, default=5, help="runs of each check measurement (default 5)")
    p.add_argument("--startup-repeat", type=int, default=15, help="runs of each start-up measurement (default 15)")
    p.add_argument("--sizes", default=",".join(SIZES), help="large images to build (default: 1 TiB,16 TiB; \"\" for none)")
    p.add_argument("--out", type=Path, help="also write the result into this Markdown file")
    p.add_argument("--tmpdir", help="where to build the images (default: the system's temp dir)")
    args = p.parse_args()
    command = shlex.join([short_path(sys.executable), short_path(__file__), *sys.argv[1:]])
    machine, load_start = machine_line(), loadavg()
    with tempfile.TemporaryDirectory(prefix="imgchain-offline-", dir=args.tmpdir) as tmp:
        work = Path(tmp)
        small_chain(work)
        pairs: list[Pair] = []
        for i, name in enumerate(s.strip() for s in args.sizes.split(",") if s.strip()):
            image = written_image(work / f"{name.replace(' ', '')}.qcow2", SIZES[name], args.writes, args.seed + i)
            same_check_output(image)
            pairs.append(Pair(f"check, {name} written", [IMGCHAIN, "check", image.name],
                              ["qemu-img", "check", image.name]))
        for pair in pairs:
            log(f"timing {pair.name}")
            measure(pair, work, args.repeat)
        same_check_output(work / "small.qcow2")
        startup = [Pair("start-up: info, small image", [IMGCHAIN, "info", "small.qcow2"],
                        ["qemu-img", "info", "small.qcow2"]),
                   Pair("start-up: check, small image", [IMGCHAIN, "check", "small.qcow2"],
                        ["qemu-img", "check", "small.qcow2"]),
                   Pair("start-up: commit, small chain", [IMGCHAIN, "commit", "-q", "run/top.qcow2"],
                        ["qemu-img", "commit", "-q", "run/top.qcow2"], fresh_chain(work))]
        installed = normal_install(work)
        startup += [Pair(f"start-up, normal install: {command}, small image", [str(installed), command, "small.qcow2"],
                         ["qemu-img", command, "small.qcow2"]) for command in ("info", "check")]
        os.sync()  # the large images' write-back would otherwise run under the start-up timings
        for pair in startup:
            log(f"timing {pair.name}")
            measure(pair, work, args.startup_repeat)
        floors = {name: [timed([sys.executable, "-c", code], work) for _ in range(args.startup_repeat)]
                  for name, code in FLOORS.items()}
    body = report(pairs + startup, floors, args, command, machine, (load_start, loadavg()))
    print(body)
    if args.out:
        write_out(args.out, body, SECTION, MARK)


if __name__ == "__main__":
    main()
