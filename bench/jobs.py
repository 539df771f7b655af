"""Stream and commit: imgchain's block jobs against qemu-img on the same chain, and the I/O stall they cause.

Builds one chain with bench/run.py's builder (a raw base fully written with
random data <- mid.qcow2 <- top.qcow2, 64 KiB clusters, a random quarter of
each overlay's clusters rewritten), then, --repeat times, runs every
measurement on a fresh copy of it, imgchain and qemu-img alternating:

- stream (flatten top.qcow2): `qemu-img rebase -b ""` (safe mode, copies every
  cluster top does not hold into top); imgchain's stream job in-process on the
  engine (no mount, like the CLI offline); and `block-stream device=drive0` on
  a mount over QMP.
- commit (mid into base): `qemu-img commit mid.qcow2`; `imgchain commit
  mid.qcow2` (the CLI's offline commit, if this imgchain has it); the
  intermediate commit job in-process on the engine; and `block-commit
  device=drive0 top-node=mid base-node=base` on a mount.
- stall: the mounted job again, while fio reads 4 KiB at random at queue depth
  1 (--direct=1) from the mounted file and logs every read's completion
  latency with a wall-clock timestamp: the longest read and the 99.9th
  percentile while the job runs and completes (its graph change drains the
  mount), against the same reader with no job (idle).

Every timed run ends with fsync of the written images (qemu-img flushes on
close anyway), and the files are read into the page cache and the dirty pages
of the copy written out before each run. Throughput is of the virtual size
(MB/s = size / seconds). Prints Markdown tables (medians, min-max over the
runs, ratios of throughput computed run by run); with --out, also puts them in
their own section of BENCHMARKS.md. Not a test.

    .venv/bin/python bench/jobs.py [--size 1G] [--repeat 3] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (IMGCHAIN, build_original, cleanup_mounts, compile_sources, imgchain_export, log,  # noqa: E402
                 machine_line, parse_size, run, short_path, warm)

from imgchain.backend import BlockBackend  # noqa: E402
from imgchain.chain import open_backing_chain  # noqa: E402
from imgchain.graph import BlockGraph  # noqa: E402
from imgchain.jobs.commit import create_commit  # noqa: E402
from imgchain.jobs.manager import JobManager  # noqa: E402
from imgchain.jobs.stream import create_stream  # noqa: E402

MARK = "<!-- bench/jobs.py: {} {} -->"  # begin/end, section
SECTION = "Block jobs: stream and commit against qemu-img"
FILES = ("base.raw", "mid.qcow2", "top.qcow2")
IDLE_SECONDS = 3.0  # the reader alone before the job starts (the idle window)
AFTER_SECONDS = 1.0  # the reader goes on after the job's completion event
JOB_TIMEOUT = 1800


# -- the runs -----------------------------------------------------------------

@dataclass
class Stall:
    job_max_ms: float
    job_p999_ms: float
    idle_max_ms: float
    idle_p999_ms: float
    reads: int  # reads completed during the job
    at_ms: float  # when the longest read completed, relative to BLOCK_JOB_COMPLETED (negative: before)
    slow: list[tuple[float, float]]  # (completion time relative to the event, latency), ms, reads over 20 ms


@dataclass
class Run:
    seconds: float  # wall clock, up to the images' fsync
    cpu: float  # CPU seconds (user + system) of the process doing the job
    stall: Stall | None = None


@dataclass
class Measure:
    name: str  # row of the table
    tool: str  # "imgchain" or "qemu-img": the ratio's side
    operation: str  # "stream" or "commit"
    runner: Callable[[Path], Run]  # the work directory -> the run
    backing_after: str | None  # top.qcow2's backing file afterwards (checked in the first repetition)
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    stalls: list[Stall] = field(default_factory=list)


def fsync_files(work: Path, names: tuple[str, ...]) -> None:
    for name in names:
        fd = os.open(work / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    """CPU seconds of a running process (utime + stime from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_process(argv: list[str], work: Path, written: tuple[str, ...]) -> Run:
    t0, c0 = time.perf_counter(), children_cpu()
    run(argv, cwd=work, timeout=JOB_TIMEOUT)
    fsync_files(work, written)
    return Run(time.perf_counter() - t0, children_cpu() - c0)


def qemu_rebase(work: Path) -> Run:
    return timed_process(["qemu-img", "rebase", "-f", "qcow2", "-b", "", "top.qcow2"], work, ("top.qcow2",))


def qemu_commit(work: Path) -> Run:
    return timed_process(["qemu-img", "commit", "-f", "qcow2", "mid.qcow2"], work, ("base.raw",))


def cli_commit(work: Path) -> Run:
    return timed_process([IMGCHAIN, "commit", "-q", "mid.qcow2"], work, ("base.raw",))


async def _engine_job(work: Path, operation: str) -> None:
    graph = BlockGraph()
    top = open_backing_chain(str(work / "top.qcow2"), writable=True)
    nodes = list(top.chain())
    graph.add_chain(top)
    graph.add_backend(BlockBackend(top))
    manager = JobManager(graph)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.serve)
            if operation == "stream":
                job = await create_stream(manager, {"device": "drive0"})
            else:
                job = await create_commit(manager, {"device": "drive0", "top-node": "mid", "base-node": "base"})
            await job.done.wait()
            nursery.cancel_scope.cancel()
        if job.error:
            raise RuntimeError(f"in-process {operation} failed: {job.error}")
    finally:
        for node in nodes:
            node.close()


def engine(operation: str) -> Callable[[Path], Run]:
    written = ("top.qcow2",) if operation == "stream" else ("base.raw", "top.qcow2")

    def runner(work: Path) -> Run:
        t0, c0 = time.perf_counter(), own_cpu()
        trio.run(_engine_job, work, operation)
        fsync_files(work, written)
        return Run(time.perf_counter() - t0, own_cpu() - c0)
    return runner


# -- QMP on a mount -------------------------------------------------------------

class Qmp:
    """Just enough QMP: commands, and waiting for an event."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(JOB_TIMEOUT)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        self.receive()  # greeting
        self.execute("qmp_capabilities")

    def receive(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise RuntimeError("the daemon closed the QMP connection")
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        self.sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        while True:
            reply = self.receive()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise RuntimeError(f"{command}: {reply['error']['desc']}")
            else:
                return reply.get("return")

    def wait_event(self, *names: str) -> dict[str, Any]:
        while True:
            event = self.events.pop(0) if self.events else self.receive()
            if event.get("event") in names:
                return event

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def socket_of(mnt: Path) -> str:
    records = json.loads(run([IMGCHAIN, "mounts", "--output", "json"]).stdout)
    return next(r["socket"] for r in records if r["mountpoint"] == os.path.realpath(mnt))


QMP_JOBS = {
    "stream": ("block-stream", {"device": "drive0"}, ("top.qcow2",)),
    "commit": ("block-commit", {"device": "drive0", "top-node": "mid", "base-node": "base"},
               ("base.raw", "top.qcow2")),
}


def run_mounted_job(work: Path, mnt: Path, pid: int, operation: str) -> tuple[Run, float, float]:
    """Start the job over QMP and wait for its end: (the run, wall-clock start, wall-clock end)."""
    command, arguments, written = QMP_JOBS[operation]
    qmp = Qmp(socket_of(mnt))
    try:
        start_wall, t0, c0 = time.time(), time.perf_counter(), process_cpu(pid)
        qmp.execute(command, **arguments)
        event = qmp.wait_event("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
        end_wall, cpu = time.time(), process_cpu(pid) - c0
        fsync_files(work, written)
        seconds = time.perf_counter() - t0
    finally:
        qmp.close()
    if event["event"] != "BLOCK_JOB_COMPLETED" or "error" in event["data"]:
        raise RuntimeError(f"mounted {operation} did not complete: {event}")
    return Run(seconds, cpu), start_wall, end_wall


def mounted(operation: str) -> Callable[[Path], Run]:
    def runner(work: Path) -> Run:
        mnt = work / "disk"
        with imgchain_export(work / "top.qcow2", mnt) as pid:
            return run_mounted_job(work, mnt, pid, operation)[0]
    return runner


# -- the stall: fio's per-read latency log around a mounted job -------------------

def read_lat_log(path: Path) -> list[tuple[float, float]]:
    """(wall-clock seconds, latency ms) per read, from a --log_unix_epoch clat log."""
    out = []
    with open(path) as f:
        for line in f:
            fields = line.split(",")
            if len(fields) >= 2:
                out.append((int(fields[0]) / 1000, int(fields[1]) / 1e6))
    return out


def p999(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.999))]


def stalled(operation: str) -> Callable[[Path], Run]:
    def runner(work: Path) -> Run:
        mnt = work / "disk"
        prefix = work / "fio-lat"
        with imgchain_export(work / "top.qcow2", mnt) as pid:
            size = os.stat(mnt).st_size
            fio = subprocess.Popen(
                ["fio", "--name=stall", f"--filename={mnt}", "--rw=randread", "--bs=4k", "--ioengine=psync",
                 "--iodepth=1", "--direct=1", f"--size={size}", "--time_based", "--runtime=3600",
                 f"--write_lat_log={prefix}", "--log_unix_epoch=1", "--randrepeat=1",
                 "--output-format=json", f"--output={work / 'fio.json'}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                time.sleep(IDLE_SECONDS)
                if fio.poll() is not None:
                    raise RuntimeError(f"fio exited early: {fio.stderr.read().decode().strip()}")  # type: ignore[union-attr]
                result, start, end = run_mounted_job(work, mnt, pid, operation)
                time.sleep(AFTER_SECONDS)
            finally:
                fio.send_signal(signal.SIGINT)
                fio.wait(timeout=60)
        reads = read_lat_log(Path(f"{prefix}_clat.1.log"))
        first = reads[0][0] if reads else start
        # fio logs a read when it completes: one the completion's drain held ends after the event.
        idle = [ms for t, ms in reads if first + 0.5 <= t < start]
        during = [(t, ms) for t, ms in reads if start <= t <= end + 0.2]
        for log_file in work.glob("fio-lat_*.log"):
            log_file.unlink()
        if not idle or not during:
            raise RuntimeError(f"fio logged no reads (idle {len(idle)}, during the job {len(during)})")
        worst_t, worst = max(during, key=lambda r: r[1])
        slow = [((t - end) * 1000, ms) for t, ms in during if ms > 20]
        lat = [ms for _, ms in during]
        result.stall = Stall(worst, p999(lat), max(idle), p999(idle), len(lat), (worst_t - end) * 1000, slow)
        return result
    return runner


# -- one repetition -------------------------------------------------------------

def fresh_copy(orig: Path, work: Path) -> None:
    """The pristine chain copied into `work`, written out, and every file read into the cache."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    for name in FILES:
        shutil.copyfile(orig / name, work / name)
    os.sync()
    warm([work / name for name in FILES])


def verify(orig: Path, work: Path, operation: str, expected: str | None) -> None:
    """The job kept the guest-visible content, and left the chain it should."""
    run(["qemu-img", "compare", "-q", str(orig / "top.qcow2"), str(work / "top.qcow2")])
    info = json.loads(run(["qemu-img", "info", "--output", "json", str(work / "top.qcow2")]).stdout)
    backing = info.get("backing-filename")
    backing = os.path.basename(backing) if backing else None  # the commit job may name it by its full path
    if backing != expected:
        raise RuntimeError(f"after the {operation}, top.qcow2's backing file is {backing!r}, not {expected!r}")
    for name in ("top.qcow2", "mid.qcow2"):
        run(["qemu-img", "check", "-q", str(work / name)])


def measures(with_cli_commit: bool) -> list[Measure]:
    out = [
        Measure("qemu-img rebase -b \"\" (safe)", "qemu-img", "stream", qemu_rebase, None),
        Measure("imgchain stream, in-process engine", "imgchain", "stream", engine("stream"), None),
        Measure("imgchain block-stream, mounted", "imgchain", "stream", mounted("stream"), None),
        Measure("imgchain block-stream, mounted, fio QD1 reading", "imgchain", "stream", stalled("stream"), None),
        Measure("qemu-img commit mid.qcow2", "qemu-img", "commit", qemu_commit, "mid.qcow2"),
    ]
    if with_cli_commit:
        out.append(Measure("imgchain commit mid.qcow2 (CLI, offline)", "imgchain", "commit", cli_commit, "mid.qcow2"))
    out += [
        Measure("imgchain commit, in-process engine", "imgchain", "commit", engine("commit"), "base.raw"),
        Measure("imgchain block-commit, mounted", "imgchain", "commit", mounted("commit"), "base.raw"),
        Measure("imgchain block-commit, mounted, fio QD1 reading", "imgchain", "commit", stalled("commit"), "base.raw"),
    ]
    return out


def has_cli_commit() -> bool:
    done = subprocess.run([IMGCHAIN, "commit", "--help"], capture_output=True, text=True)
    return done.returncode == 0


def repetition(orig: Path, work: Path, plan: list[Measure], check: bool, wanted: Callable[[Measure], bool]) -> None:
    for m in plan:
        if not wanted(m):
            continue
        fresh_copy(orig, work)
        result = m.runner(work)
        stall = result.stall
        if stall is not None:
            m.stalls.append(stall)
            extra = (f"  stall: max {stall.job_max_ms:.1f} ms, p99.9 {stall.job_p999_ms:.2f} ms "
                     f"at {stall.at_ms:+.0f} ms from the event (idle {stall.idle_max_ms:.1f} / "
                     f"{stall.idle_p999_ms:.2f} ms, {stall.reads} reads); over 20 ms (at, ms): "
                     + " ".join(f"({a:+.0f}, {ms:.0f})" for a, ms in stall.slow))
        else:
            extra = ""
        m.seconds.append(result.seconds)
        m.cpu.append(result.cpu)
        log(f"{m.name:50} {result.seconds:7.2f} s {result.cpu:6.2f} s CPU{extra}")
        if check:
            verify(orig, work, m.operation, m.backing_after)
        shutil.rmtree(work)


# -- report ---------------------------------------------------------------------

def mbps(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def ratios(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})" if values else "-"


def table(plan: list[Measure], size: int) -> str:
    rows = ["| operation | run | seconds (median) | min-max s | MB/s (median) | imgchain/qemu-img throughput "
            "| CPU s (median) | qemu-img/imgchain CPU s |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in plan:
        if not m.seconds:
            continue
        ref = next(r for r in plan if r.operation == m.operation and r.tool == "qemu-img")
        if m is ref:
            ratio = cpu_ratio = "1 (reference)"
        else:  # run by run: qemu-img/imgchain seconds of the same repetition
            ratio = ratios([q / s for s, q in zip(m.seconds, ref.seconds)])
            cpu_ratio = ratios([q / c for c, q in zip(m.cpu, ref.cpu) if c]) if not m.stalls else \
                "- (serves fio too)"
        med = statistics.median(m.seconds)
        rows.append(f"| {m.operation} | {m.name} | {med:.2f} | {min(m.seconds):.2f}-{max(m.seconds):.2f} "
                    f"| {mbps(size, med):,.0f} | {ratio} | {statistics.median(m.cpu):.2f} | {cpu_ratio} |")
    return "\n".join(rows)


def stall_table(plan: list[Measure]) -> str:
    rows = ["| job (mounted) | longest read during the job, ms: median (min-max) | p99.9 during the job, ms "
            "| longest read ended, ms from BLOCK_JOB_COMPLETED | longest read idle, ms | p99.9 idle, ms "
            "| reads during the job |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for m in plan:
        if not m.stalls:
            continue
        s = m.stalls

        def fig(attr: str, digits: int) -> str:
            vals = [getattr(x, attr) for x in s]
            return f"{statistics.median(vals):.{digits}f} ({min(vals):.{digits}f}-{max(vals):.{digits}f})"
        rows.append(f"| {m.operation} | {fig('job_max_ms', 1)} | {fig('job_p999_ms', 2)} "
                    f"| {fig('at_ms', 0)} | {fig('idle_max_ms', 1)} | {fig('idle_p999_ms', 2)} "
                    f"| {statistics.median(x.reads for x in s):,.0f} |")
    return "\n".join(rows)


def report(plan: list[Measure], args: argparse.Namespace, size: int, command: str, machine: str,
           cli_commit_note: str) -> str:
    runs = f"{args.repeat} runs" if args.repeat > 1 else "one run"
    return "\n".join([
        f"### {SECTION}", "",
        f"Measured {machine}.", "",
        f"Chain: base.raw ({args.size}, fully written with random data) <- mid.qcow2 <- top.qcow2, 64 KiB "
        f"clusters, a random quarter of each overlay's clusters rewritten (so a full stream writes about "
        f"three quarters of the size into top.qcow2, and a commit of mid a quarter into base.raw). Every run "
        f"starts from a fresh copy of the chain (written out, then read into the page cache) and its time "
        f"includes an fsync of the images it wrote; MB/s are of the virtual size. Each figure is the median "
        f"of {runs}, the runs of one repetition back to back in table order; ratios are of throughput "
        f"(qemu-img's seconds / imgchain's), computed run by run against the same repetition's qemu-img run "
        f"(median, then min-max). In-process: the job engine in this Python process with no mount "
        f"(what the CLI does offline). Mounted: `imgchain mount top.qcow2`, timed from the QMP command to "
        f"BLOCK_JOB_COMPLETED, then the fsync. `qemu-img commit` also empties mid.qcow2 afterwards (as `imgchain commit` "
        f"offline does); the intermediate commit job leaves mid.qcow2 as it was and re-points top.qcow2 to "
        f"base.raw. {cli_commit_note}", "",
        table(plan, size), "",
        f"Stall: fio `--rw=randread --bs=4k --ioengine=psync --iodepth=1 --direct=1` on the mounted file, "
        f"every read's completion latency logged with its time; \"during the job\" is from the QMP command to "
        f"0.2 s after BLOCK_JOB_COMPLETED (the completion drains the mount for its graph change), \"idle\" "
        f"the {IDLE_SECONDS - 0.5:.1f} s before the command with no job. Median over the runs (min-max).", "",
        stall_table(plan), "",
        "Command:", "", "```sh", command, "```",
    ])


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def write_out(path: Path, body: str, section: str = SECTION, mark: str = MARK) -> None:
    """Replace a benchmark's section between its markers, or add it; the rest stays."""
    begin, end = mark.format("begin", section), mark.format("end", section)
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


# -- main -------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1G", help="virtual size of the chain (default 1G)")
    p.add_argument("--repeat", type=int, default=3, help="runs of every measurement (default 3); tables give medians")
    p.add_argument("--seed", type=int, default=1, help="random seed of the chain's content")
    p.add_argument("--only", help="run only the measurements whose name contains one of these comma-separated "
                                  "words (qemu-img runs always run: the ratios need them)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the content check (qemu-img compare) after the first repetition's runs")
    p.add_argument("--out", type=Path, help="also write the result into this Markdown file")
    p.add_argument("--tmpdir", help="where to build the chain (default: the system's temp dir)")
    args = p.parse_args()
    size = parse_size(args.size)
    if size % (64 * 1024):
        p.error("--size must be a multiple of 64 KiB")
    command = shlex.join([short_path(sys.executable), short_path(__file__), *sys.argv[1:]])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    cli = has_cli_commit()
    cli_note = ("" if cli else "`imgchain commit` (offline, the CLI) does not exist in this imgchain yet: "
                "not measured.")
    plan = measures(cli)
    words = args.only.split(",") if args.only else None

    def wanted(m: Measure) -> bool:
        return m.tool == "qemu-img" or words is None or any(w in m.name for w in words)

    work_root = Path(tempfile.mkdtemp(prefix="imgchain-bench-jobs-", dir=args.tmpdir))
    os.environ["IMGCHAIN_RUNTIME_DIR"] = str(work_root / "run")
    compile_sources()
    machine, load_start = machine_line(), loadavg()
    try:
        orig = build_original(work_root, size, args.seed)
        for i in range(args.repeat):
            log(f"-- repetition {i + 1} of {args.repeat}")
            repetition(orig, work_root / "w", plan, i == 0 and not args.no_verify, wanted)
    except BaseException:
        for log_file in sorted((work_root / "run").glob("*.log")):
            log(f"--- {log_file.name} (last lines)\n" + "".join(log_file.read_text().splitlines(True)[-20:]))
        raise
    finally:
        cleanup_mounts(work_root)
        shutil.rmtree(work_root, ignore_errors=True)
    machine += (f"; load average (1, 5, 15 min) {load_start} at the start, {loadavg()} at the end "
                f"(other processes on the machine compete for its CPUs and disk)")
    body = report(plan, args, size, command, machine, cli_note)
    print(body)
    if args.out:
        write_out(args.out, body)


if __name__ == "__main__":
    main()
