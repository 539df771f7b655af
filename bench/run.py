"""imgchain against qemu-storage-daemon and a bare pyfuse3 passthrough, through FUSE, with fio.

Builds a three-layer chain in a temporary directory (a raw base fully written
with random data, then mid.qcow2 and top.qcow2 with 64 KiB clusters, each with
a quarter of its clusters rewritten at random), and exports it in turn with
`imgchain mount`, with `qemu-storage-daemon --export type=fuse`, and with
bench/passthrough.py over a raw copy of the chain (`qemu-img convert -O raw`).
The same fio jobs (--direct=1, time based) run against each; every write job
gets a fresh copy of the written image, so every exporter starts from the same
state, and the files an exporter reads are read whole (into the page cache)
first. Prints Markdown tables (IOPS, MB/s, ratios; the spread over --repeat
runs; mean latency); with --out, also puts them in BENCHMARKS.md, in a section
of their own (unpinned, or --pin CPU; --top-allocated apart) that the next
such run replaces. Round trips through FUSE on a small VM vary a lot with
where the two processes run: --pin puts fio and each exporter on one CPU.
--top-allocated writes every cluster of top.qcow2 before the jobs, so that
writes never copy on write; --jobs picks jobs by name. Not a test.

    .venv/bin/python bench/run.py [--runtime 10] [--size 1G] [--repeat N] [--pin CPU]
                                  [--top-allocated] [--jobs randwrite,...] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import imgchain
from imgchain.extent import Status

BENCH = Path(__file__).resolve().parent
IMGCHAIN = str(Path(sys.executable).with_name("imgchain"))
CLUSTER = 64 * 1024
MOUNT_TIMEOUT = 60
MARK = "<!-- bench/run.py: {} {} -->"  # begin/end, section
PIN: list[str] = []  # `taskset -c CPU` for fio and the exporters, with --pin


@dataclass(frozen=True)
class Job:
    name: str
    rw: str
    bs: str
    engine: str
    depth: int

    @property
    def writes(self) -> bool:
        return "write" in self.rw

    def fio_args(self) -> list[str]:
        return [f"--rw={self.rw}", f"--bs={self.bs}", f"--ioengine={self.engine}", f"--iodepth={self.depth}"]


JOBS = [
    Job("4k randread qd1 psync", "randread", "4k", "psync", 1),
    Job("4k randwrite qd1 psync", "randwrite", "4k", "psync", 1),
    Job("4k randread qd16 libaio", "randread", "4k", "libaio", 16),
    Job("4k randwrite qd16 libaio", "randwrite", "4k", "libaio", 16),
    Job("1M seq read qd1 psync", "read", "1m", "psync", 1),
    Job("1M seq write qd1 psync", "write", "1m", "psync", 1),
]


@dataclass
class Result:
    iops: float
    mbps: float
    lat_us: float


def median(runs: list[Result]) -> Result:
    """Each figure's median over the runs."""
    return Result(*(statistics.median(getattr(r, f) for r in runs) for f in ("iops", "mbps", "lat_us")))


# -- helpers ----------------------------------------------------------------

def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper()
    return int(float(t[:-1]) * units[t[-1]]) if t[-1] in units else int(t)


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(map(str, argv))} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def mounted_paths() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f}


def is_mounted(path: Path) -> bool:
    return os.path.realpath(path) in mounted_paths()


def wait_mounted(path: Path, proc: subprocess.Popen[bytes] | None, what: str) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not is_mounted(path):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) before mounting {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not mount {path} within {MOUNT_TIMEOUT} s")
        time.sleep(0.02)


def force_unmount(path: Path) -> None:
    """Last resort: fusermount3 -u, then a lazy unmount."""
    for argv in (["fusermount3", "-u", str(path)], ["fusermount3", "-uz", str(path)]):
        if not is_mounted(path):
            return
        subprocess.run(argv, capture_output=True)


def stop(proc: subprocess.Popen[bytes], mountpoint: Path) -> None:
    """SIGTERM the daemon (it unmounts itself), then make sure the mount is gone."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            force_unmount(mountpoint)
            proc.kill()
            proc.wait()
    force_unmount(mountpoint)


# -- the chain --------------------------------------------------------------

def write_random_file(path: Path, size: int, rng: random.Random) -> None:
    chunk = 16 << 20
    with open(path, "wb") as f:
        for pos in range(0, size, chunk):
            f.write(rng.randbytes(min(chunk, size - pos)))


def rewrite_quarter(path: Path, size: int, rng: random.Random) -> None:
    """Rewrite a random quarter of the clusters with random data (imgchain's Python API)."""
    clusters = size // CLUSTER
    with imgchain.open_chain(path, writable=True) as chain:
        for index in rng.sample(range(clusters), clusters // 4):
            chain.write(index * CLUSTER, rng.randbytes(CLUSTER))


def allocate_rest(path: Path, size: int, rng: random.Random) -> None:
    """Write random data to every cluster the image itself does not hold yet."""
    with imgchain.open_chain(path, writable=True) as chain:
        for ext in chain.active.driver.block_status(0, size):
            if ext.status is Status.UNALLOCATED:
                for pos in range(ext.guest_offset, ext.guest_offset + ext.length, CLUSTER):
                    chain.write(pos, rng.randbytes(CLUSTER))


def build_original(work_root: Path, size: int, seed: int) -> Path:
    """The chain every run of a job benchmark copies afresh: built once in
    work_root/orig, timed in the log; returns that folder."""
    orig = work_root / "orig"
    orig.mkdir()
    t0 = time.monotonic()
    build_chain(orig, size, seed)
    log(f"chain built in {time.monotonic() - t0:.1f} s in {orig}")
    return orig


def build_chain(work: Path, size: int, seed: int, top_allocated: bool = False) -> Path:
    """base.raw <- mid.qcow2 <- top.qcow2; returns top.qcow2. With
    `top_allocated`, every cluster of top.qcow2 is then written too."""
    rng = random.Random(seed)
    write_random_file(work / "base.raw", size, rng)
    for name, backing, fmt in (("mid.qcow2", "base.raw", "raw"), ("top.qcow2", "mid.qcow2", "qcow2")):
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}",
             "-b", backing, "-F", fmt, name, str(size)], cwd=work)
        rewrite_quarter(work / name, size, rng)
    if top_allocated:
        allocate_rest(work / "top.qcow2", size, rng)
    for name in ("mid.qcow2", "top.qcow2"):
        run(["qemu-img", "check", "-q", str(work / name)])
    return work / "top.qcow2"


# -- exporters --------------------------------------------------------------
# Each is a context manager: (image, mount point file) -> the serving process's pid.

@contextmanager
def imgchain_export(image: Path, mnt: Path) -> Iterator[int]:
    # cwd: `python -m` puts it first on sys.path; the daemon must import the imgchain we imported.
    run([*PIN, IMGCHAIN, "mount", str(image), str(mnt)], cwd=image.parent)
    try:
        records = json.loads(run([IMGCHAIN, "mounts", "--output", "json"]).stdout)
        pid = next(r["pid"] for r in records if r["mountpoint"] == os.path.realpath(mnt))
        yield pid
    finally:
        done = subprocess.run([IMGCHAIN, "unmount", str(mnt)], capture_output=True, text=True)
        if done.returncode != 0:
            log(f"imgchain unmount {mnt}: {done.stderr.strip()}")
        force_unmount(mnt)


@contextmanager
def qsd_export(image: Path, mnt: Path) -> Iterator[int]:
    mnt.touch()  # qsd's FUSE export needs an existing regular file
    log_path = image.parent / "qsd.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [*PIN, "qemu-storage-daemon",
             "--blockdev", f"driver=file,node-name=file0,filename={image}",
             "--blockdev", "driver=qcow2,node-name=fmt0,file=file0",
             "--export", f"type=fuse,id=exp0,node-name=fmt0,mountpoint={mnt},writable=on"],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
    try:
        try:
            wait_mounted(mnt, proc, "qemu-storage-daemon")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {log_path.read_text().strip()}") from None
        yield proc.pid
    finally:
        stop(proc, mnt)


@contextmanager
def passthrough_export(image: Path, mnt: Path) -> Iterator[int]:
    mnt.touch()
    proc = subprocess.Popen([*PIN, sys.executable, str(BENCH / "passthrough.py"), str(image), str(mnt)],
                            stdin=subprocess.DEVNULL)
    try:
        wait_mounted(mnt, proc, "passthrough.py")
        yield proc.pid
    finally:
        stop(proc, mnt)


@dataclass(frozen=True)
class Exporter:
    name: str
    export: Callable[[Path, Path], ContextManager[int]]
    image: str  # which file of the work directory it serves (and copies for writes)
    below: tuple[str, ...] = ()  # the files it reads besides `image`


EXPORTERS = [
    Exporter("imgchain", imgchain_export, "top.qcow2", ("mid.qcow2", "base.raw")),
    Exporter("qsd", qsd_export, "top.qcow2", ("mid.qcow2", "base.raw")),
    Exporter("passthrough", passthrough_export, "chain.raw"),
]


def warm(paths: list[Path]) -> None:
    """Read files whole so every exporter starts with its data in the page cache (some
    VMs page out cache that has gone unread for a minute)."""
    buf = bytearray(16 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# -- fio --------------------------------------------------------------------

def run_fio(job: Job, target: Path, size: int, runtime: int, ramp: int) -> Result:
    argv = [*PIN, "fio", f"--name={job.name.replace(' ', '-')}", f"--filename={target}", *job.fio_args(),
            "--direct=1", f"--size={size}", "--time_based", f"--runtime={runtime}",
            f"--ramp_time={ramp}", "--randrepeat=1", "--output-format=json"]
    out = run(argv, timeout=runtime + ramp + 120).stdout
    data = json.loads(out[out.index("{"):])  # fio may print notes before the JSON
    side = data["jobs"][0]["write" if job.writes else "read"]
    return Result(side["iops"], side["bw_bytes"] / 1e6, side["clat_ns"]["mean"] / 1e3)


def measure(work: Path, job: Job, exporter: Exporter, size: int, runtime: int, ramp: int) -> Result:
    image = work / exporter.image
    if job.writes:  # a fresh copy of the written file, next to its backing files
        fresh = work / f"w-{exporter.name}-{exporter.image}"
        shutil.copyfile(image, fresh)
        image = fresh
    mnt = work / f"mnt-{exporter.name}"
    warm([image, *(work / name for name in exporter.below)])
    try:
        with exporter.export(image, mnt):
            return run_fio(job, mnt, size, runtime, ramp)
    finally:
        if job.writes:
            image.unlink(missing_ok=True)


# -- report -----------------------------------------------------------------

def imgchain_source() -> str:
    """Which imgchain was measured: its git revision, or where it was imported from."""
    pkg = Path(imgchain.__file__).resolve().parent
    try:
        rev = run(["git", "-C", str(pkg), "describe", "--always", "--dirty"]).stdout.strip()
    except (RuntimeError, OSError):
        return f"imgchain imported from {pkg}"
    return f"imgchain {rev} ({pkg.parent})"


def fusectl_mounted() -> bool:
    """Can a daemon raise max_background (the fusectl filesystem is mounted)?"""
    with open("/proc/self/mounts") as f:
        return any(line.split()[2] == "fusectl" for line in f)


SOURCE_DIRS = ("imgchain", "formats", "cli", "fuse")


def compile_sources() -> None:
    """Compile the project's modules to bytecode once, as an installed
    package has them: with PYTHONDONTWRITEBYTECODE set (as on these
    machines) every imgchain process timed here would otherwise compile
    its sources again at start (0.2 s for `imgchain commit`)."""
    root = Path(__file__).resolve().parent.parent
    run([sys.executable, "-m", "compileall", "-q", *(str(root / d) for d in SOURCE_DIRS)])


def machine_line() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor() or "?")
    qemu = run(["qemu-storage-daemon", "--version"]).stdout.splitlines()[0]
    fio = run(["fio", "--version"]).stdout.strip()
    tunable = ("yes (fusectl mounted: imgchain and the passthrough set 64, qsd keeps 12)"
               if fusectl_mounted() else "no (fusectl not mounted: 12 for all)")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{date}; {os.cpu_count()} CPUs, {model}; kernel {platform.release()}; "
            f"Python {platform.python_version()}; {qemu}; {fio}; FUSE max_background tunable: {tunable}; "
            f"{imgchain_source()}")


def ratio(runs_a: list[Result], runs_b: list[Result]) -> str:
    """The median of the run-by-run ratios (runs of one repetition are back to back)."""
    ratios = [a.iops / b.iops for a, b in zip(runs_a, runs_b) if b.iops]
    return f"{statistics.median(ratios):.2f}" if ratios else "-"


def spread(runs: list[Result]) -> str:
    lo, hi = min(r.iops for r in runs), max(r.iops for r in runs)
    return f"{lo:,.0f}-{hi:,.0f}" if len(runs) > 1 else f"{lo:,.0f}"


def measured(runs: dict[tuple[str, str], object]) -> list[Job]:
    """The jobs that ran, in the order of JOBS."""
    return [job for job in JOBS if (job.name, EXPORTERS[0].name) in runs]


def table(runs: dict[tuple[str, str], list[Result]]) -> str:
    rows = ["| job | imgchain IOPS | imgchain MB/s | qsd IOPS | qsd MB/s | passthrough IOPS "
            "| imgchain/qsd | imgchain/passthrough |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for job in measured(runs):
        ri, rq, rp = (runs[job.name, e.name] for e in EXPORTERS)
        i, q, p = median(ri), median(rq), median(rp)
        rows.append(f"| {job.name} | {i.iops:,.0f} | {i.mbps:,.1f} | {q.iops:,.0f} | {q.mbps:,.1f} "
                    f"| {p.iops:,.0f} | {ratio(ri, rq)} | {ratio(ri, rp)} |")
    return "\n".join(rows)


def latency_table(results: dict[tuple[str, str], Result]) -> str:
    rows = ["| job | " + " | ".join(f"{e.name} µs" for e in EXPORTERS) + " |",
            "|---|" + "---:|" * len(EXPORTERS)]
    for job in measured(results):
        rows.append(f"| {job.name} | " + " | ".join(f"{results[job.name, e.name].lat_us:,.1f}"
                                                    for e in EXPORTERS) + " |")
    return "\n".join(rows)


def spread_table(runs: dict[tuple[str, str], list[Result]]) -> str:
    rows = ["| job | " + " | ".join(f"{e.name} IOPS" for e in EXPORTERS) + " |",
            "|---|" + "---:|" * len(EXPORTERS)]
    for job in measured(runs):
        rows.append(f"| {job.name} | " + " | ".join(spread(runs[job.name, e.name]) for e in EXPORTERS) + " |")
    return "\n".join(rows)


def report(runs: dict[tuple[str, str], list[Result]], args: argparse.Namespace, command: str,
           machine: str) -> str:
    results = {key: median(r) for key, r in runs.items()}
    repeats = (f"the median of {args.repeat} runs, and each ratio the median of the run-by-run ratios"
               if args.repeat > 1 else "one run")
    placement = (f"fio and each exporter pinned to CPU {args.pin} (`taskset -c {args.pin}`)"
                 if args.pin is not None else "fio and the exporters not pinned")
    return "\n".join([
        f"### {section(args)}", "",
        f"Measured {machine}.", "",
        f"Chain: base.raw ({args.size}, fully written with random data) <- mid.qcow2 <- top.qcow2, "
        f"64 KiB clusters, a random quarter of each overlay's clusters rewritten"
        f"{TOP_ALLOCATED if args.top_allocated else ''}. "
        f"fio --direct=1, time based, {args.runtime} s per job after {args.ramp} s of ramp, "
        f"--size={args.size}; each write job starts from a fresh copy of the written image, and the "
        f"files an exporter reads are read whole into the page cache just before its job. "
        f"qsd is `qemu-storage-daemon` (file + qcow2 blockdevs, defaults, `--export type=fuse,writable=on`); "
        f"passthrough is `bench/passthrough.py` over `qemu-img convert -O raw` of the chain. "
        f"{placement[0].upper()}{placement[1:]}. "
        f"Each figure is {repeats} (exporters interleaved job by job); ratios are of IOPS.", "",
        table(runs), "",
        "Lowest and highest IOPS over the runs:", "",
        spread_table(runs), "",
        "Mean completion latency per request (fio clat):", "",
        latency_table(results), "",
        "Command:", "", "```sh", command, "```",
    ])


TOP_ALLOCATED = (", then every other cluster of top.qcow2 written (--top-allocated): no write copies "
                 "on write, and every read finds its data in top.qcow2")


def section(args: argparse.Namespace) -> str:
    name = f"Pinned to one CPU (--pin {args.pin})" if args.pin is not None else "Not pinned"
    return name + (", top allocated" if args.top_allocated else "")


def write_out(path: Path, body: str, name: str) -> None:
    """Replace the section `name` between its markers, or add it; the rest stays."""
    begin, end = MARK.format("begin", name), MARK.format("end", name)
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.exists() else \
        "# Benchmarks\n\nWritten by `bench/run.py --out`: each run replaces its own section " \
        "(between its markers) and keeps the rest.\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


# -- main -------------------------------------------------------------------

def short_path(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def cleanup_mounts(work: Path) -> None:
    prefix = os.path.realpath(work) + "/"
    for path in mounted_paths():
        if path.startswith(prefix):
            force_unmount(Path(path))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime", type=int, default=10, help="seconds per fio job (default 10)")
    p.add_argument("--ramp", type=int, default=2, help="fio ramp time in seconds, not counted (default 2)")
    p.add_argument("--size", default="1G", help="virtual size of the chain (default 1G)")
    p.add_argument("--repeat", type=int, default=1, help="runs of every job; the table gives the median")
    p.add_argument("--pin", type=int, metavar="CPU",
                   help="run fio and each exporter on this CPU only (steadier on small VMs)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the chain's content")
    p.add_argument("--out", type=Path, help="also write the result into this Markdown file")
    p.add_argument("--tmpdir", help="where to build the chain (default: the system's temp dir)")
    p.add_argument("--top-allocated", action="store_true",
                   help="write every cluster of top.qcow2 first (measures I/O without copy-on-write)")
    p.add_argument("--jobs", help="run only the jobs whose name contains one of these comma-separated words")
    args = p.parse_args()
    jobs = [j for j in JOBS if not args.jobs or any(w in j.name for w in args.jobs.split(","))]
    if not jobs:
        p.error(f"--jobs {args.jobs}: no job matches (jobs: {', '.join(j.name for j in JOBS)})")
    size = parse_size(args.size)
    if size % CLUSTER:
        p.error("--size must be a multiple of 64 KiB")
    command = shlex.join([short_path(sys.executable), short_path(__file__), *sys.argv[1:]])
    if os.environ.get("PYTHONPATH"):
        command = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} {command}"
    if args.pin is not None:
        PIN[:] = ["taskset", "-c", str(args.pin)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks

    work = Path(tempfile.mkdtemp(prefix="imgchain-bench-", dir=args.tmpdir))
    os.environ["IMGCHAIN_RUNTIME_DIR"] = str(work / "run")
    runs: dict[tuple[str, str], list[Result]] = {}
    compile_sources()
    machine, fusectl = machine_line(), fusectl_mounted()
    try:
        t0 = time.monotonic()
        build_chain(work, size, args.seed, args.top_allocated)
        run(["qemu-img", "convert", "-O", "raw", str(work / "top.qcow2"), str(work / "chain.raw")])
        log(f"chain built in {time.monotonic() - t0:.1f} s in {work}")
        for _ in range(args.repeat):
            for job in jobs:
                for exporter in EXPORTERS:
                    r = measure(work, job, exporter, size, args.runtime, args.ramp)
                    runs.setdefault((job.name, exporter.name), []).append(r)
                    log(f"{job.name:26} {exporter.name:12} {r.iops:10,.0f} IOPS {r.mbps:9,.1f} MB/s "
                        f"{r.lat_us:9,.1f} µs")
    except BaseException:
        for log_file in sorted((work / "run").glob("*.log")):
            log(f"--- {log_file.name} (last lines)\n" + "".join(log_file.read_text().splitlines(True)[-20:]))
        raise
    finally:
        cleanup_mounts(work)
        shutil.rmtree(work, ignore_errors=True)
    if fusectl_mounted() != fusectl:
        machine += " (fusectl was mounted or unmounted during the run)"
    body = report(runs, args, command, machine)
    print(body)
    if args.out:
        write_out(args.out, body, section(args))


if __name__ == "__main__":
    main()
