"""Where an imgchain mount's daemon spends its time under fio: py-spy, summarised.

Builds the same chain as bench/run.py, mounts a fresh copy of it with
`imgchain mount`, runs one fio job (4 KiB random read or write at queue depth
1 by default) and samples the daemon with `py-spy record --format raw` while
the job runs. By default that is a CPU profile (py-spy drops samples of a
thread blocked in a syscall); with --idle, time blocked in pread/pwrite/
fdatasync and in the reply to the kernel counts too (the wait for the next
request is recognised by its frame and set apart either way).
Prints, per job: the split between waiting for the next FUSE
request, pyfuse3 (its Cython dispatch and the /dev/fuse read/reply), trio's
scheduler and imgchain's own modules; the top functions by self time; and the
inclusive time of imgchain's functions. The raw stacks stay in --keep (feed
them to flamegraph.pl or speedscope). Needs py-spy (`pip install py-spy`) and
root. Not a test.

    .venv/bin/python bench/profile.py [--jobs JOB,JOB] [--exporter passthrough] [--idle] [--duration 15]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import run as bench  # bench/run.py: the chain, the exporters, fio

PY_SPY = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
# A project module by its path's tail: work tree (fuse/export.py) or installed (imgchain/fuse/export.py).
PROJECT = re.compile(r"(?:^|/)((?:fuse|formats|imgchain)/[^/]+\.py|passthrough\.py)$")
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
IDLE = {"EpollIOManager.get_events", "epoll_wait"}  # the loop waits for the next request
NOT_BUSY = ("idle", "other threads")


def parse(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    """Collapsed stacks (root first) as [(func, file)], with their sample counts."""
    stacks = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        text, count = line.rsplit(" ", 1)
        frames = []
        for raw in text.split(";"):
            m = FRAME.match(raw)
            frames.append((m["func"], m["file"]) if m else (raw, "?"))
        stacks.append((frames, int(count)))
    return stacks


def module_of(file: str) -> str | None:
    m = PROJECT.search(file)
    return m.group(1) if m else None


def handler_frames(frames: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The frames of the daemon's own request handlers: project code that pyfuse3 called."""
    first = next((i for i, (_, file) in enumerate(frames) if "pyfuse3" in file), len(frames))
    return [(func, file) for func, file in frames[first:] if module_of(file)]


def category(frames: list[tuple[str, str]]) -> str:
    """Who a sample's time belongs to: the deepest handler frame (with whatever
    library code it calls), else the library the sample is in."""
    func, file = frames[-1]
    if func in IDLE:
        return "idle: waiting for the next FUSE request (epoll)"
    if any("_bootstrap" in f for f, _ in frames):
        return "other threads (trio's worker threads)"
    handlers = handler_frames(frames)
    if handlers:
        return f"handler: {module_of(handlers[-1][1])}"
    for func, file in reversed(frames):
        if "trio/" in file or "outcome/" in file or "attrs generated" in file:
            return "trio: scheduler, locks, epoll registration (pyfuse3's request loop)"
        if "pyfuse3" in file:
            return "pyfuse3: Cython dispatch + /dev/fuse read and reply"
    return "other"


def summarise(path: Path, top: int = 25) -> str:
    total = 0
    cats: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for frames, n in parse(path):
        total += n
        cat = category(frames)
        cats[cat] += n
        if cat.startswith(NOT_BUSY):
            continue
        func, file = frames[-1]
        self_time[f"{func} ({module_of(file) or file.split('site-packages/')[-1]})"] += n
        for key in {f"{fn} ({module_of(fl)})" for fn, fl in handler_frames(frames)}:
            inclusive[key] += n
    busy = sum(self_time.values()) or 1
    out = [f"{total} samples, {busy} busy (the main thread not waiting for a request)", "",
           "| where | % of samples | % of busy |", "|---|---:|---:|"]
    for name, n in cats.most_common():
        share = "" if name.startswith(NOT_BUSY) else f"{100 * n / busy:.1f}"
        out.append(f"| {name} | {100 * n / total:.1f} | {share} |")
    out += ["", "| self time: function (module) | % of busy |", "|---|---:|"]
    out += [f"| {name} | {100 * n / busy:.1f} |" for name, n in self_time.most_common(top)]
    out += ["", "| inclusive: handler function (module) | % of busy |", "|---|---:|"]
    out += [f"| {name} | {100 * n / busy:.1f} |" for name, n in inclusive.most_common(25)]
    return "\n".join(out)


def profile_job(work: Path, exporter: bench.Exporter, job: bench.Job, size: int, duration: int,
                rate: int, idle: bool, keep: Path) -> str:
    image = work / f"w-{exporter.image}"
    shutil.copyfile(work / exporter.image, image)
    mnt = work / "mnt"
    stacks = keep / f"{exporter.name}-{job.name.replace(' ', '-')}.txt"
    bench.warm([image, *(work / name for name in exporter.below)])
    try:
        with exporter.export(image, mnt) as pid:
            fio = subprocess.Popen(
                ["fio", "--name=profile", f"--filename={mnt}", *job.fio_args(), "--direct=1",
                 f"--size={size}", "--time_based", f"--runtime={duration + 4}", "--output-format=json"],
                stdout=subprocess.PIPE, text=True)
            try:
                time.sleep(2)
                bench.run([PY_SPY, "record", "--pid", str(pid), "--duration", str(duration),
                           "--rate", str(rate), *(["--idle"] if idle else []),
                           "--format", "raw", "-o", str(stacks)])
            finally:
                out, _ = fio.communicate(timeout=duration + 120)
        data = json.loads(out[out.index("{"):])["jobs"][0]
        side = data["write" if job.writes else "read"]
        head = f"### {exporter.name}, {job.name}: {side['iops']:,.0f} IOPS while sampled at {rate} Hz"
        return f"{head}\n\n{summarise(stacks)}\n\nRaw stacks: {stacks}"
    finally:
        image.unlink(missing_ok=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", default="4k randread qd1 psync,4k randwrite qd1 psync",
                   help="comma-separated job names of bench/run.py")
    p.add_argument("--exporter", choices=["imgchain", "passthrough"], default="imgchain",
                   help="profile imgchain, or the bare passthrough for comparison")
    p.add_argument("--duration", type=int, default=15, help="seconds of sampling per job")
    p.add_argument("--idle", action="store_true",
                   help="also count time blocked in syscalls (wall-clock view)")
    p.add_argument("--rate", type=int, default=1000, help="samples per second")
    p.add_argument("--size", default="1G")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", type=Path, default=Path(tempfile.gettempdir()) / "imgchain-profile",
                   help="where the raw stacks are kept")
    p.add_argument("--summarise", type=Path, nargs="*", help="only summarise existing raw stack files")
    args = p.parse_args()
    if args.summarise:
        for path in args.summarise:
            print(f"### {path}\n\n{summarise(path)}\n")
        return
    if PY_SPY is None:
        sys.exit("py-spy not found: pip install py-spy")
    jobs = {j.name: j for j in bench.JOBS}
    selected = [jobs[name.strip()] for name in args.jobs.split(",")]
    size = bench.parse_size(args.size)
    args.keep.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="imgchain-profile-"))
    os.environ["IMGCHAIN_RUNTIME_DIR"] = str(work / "run")
    exporter = next(e for e in bench.EXPORTERS if e.name == args.exporter)
    try:
        bench.build_chain(work, size, args.seed)
        if exporter.image == "chain.raw":
            bench.run(["qemu-img", "convert", "-O", "raw", str(work / "top.qcow2"), str(work / "chain.raw")])
        for job in selected:
            print(profile_job(work, exporter, job, size, args.duration, args.rate, args.idle, args.keep),
                  "\n", flush=True)
    finally:
        bench.cleanup_mounts(work)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
