"""Active commit and live snapshot under fio writes: imgchain against qemu-storage-daemon on the same chain.

Builds the chain of bench/run.py (a raw base fully written with random data
<- mid.qcow2 <- top.qcow2, 64 KiB clusters, a random quarter of each
overlay's clusters rewritten) and then, --repeat times, for fio queue depth
1 (psync) and 16 (libaio), on a fresh copy of the chain for each exporter,
imgchain and qsd back to back:

1. mounts top.qcow2: `imgchain mount`, or `qemu-storage-daemon` with the
   chain's blockdevs named base, mid and top (so that both take the same
   node names) and a writable FUSE export of top, with a QMP socket;
2. starts fio: 4 KiB random writes, --direct=1, over the whole disk (or
   --fio-size), every write's completion latency logged with a wall-clock
   timestamp;
3. after IDLE_SECONDS, the active commit of top into mid (`block-commit
   device=... base-node=mid job-id=job0`), timed to BLOCK_JOB_READY (its
   offset: the bytes the job copied by then);
4. SETTLE_SECONDS later, `block-job-complete`: the pivot, timed to
   BLOCK_JOB_COMPLETED; the mount is then on mid.qcow2;
5. SETTLE_SECONDS later, `blockdev-snapshot-sync` of the mount's active
   node (now mid) into a new snap.qcow2 (mode absolute-paths), timed from
   the command to its reply;
6. fio goes on for SETTLE_SECONDS, then stops.

The stall of a window (the pivot, the snapshot) is over the writes that were
in flight at some moment of it (issued before its end, completed after its
start): the longest and the 99.9th percentile, next to the same figures for
the writes before the job (idle). Afterwards mid.qcow2 and snap.qcow2 pass
`qemu-img check` and snap.qcow2's backing file is mid.qcow2. Prints Markdown
tables (medians, min-max, imgchain/qsd ratios computed run by run); with
--out, also puts them in their own section of BENCHMARKS.md. Not a test.

    .venv/bin/python bench/active.py [--size 1G] [--repeat 3] [--fio-size SIZE] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jobs import fresh_copy, loadavg, p999, read_lat_log, socket_of, write_out  # noqa: E402
from run import (build_original, cleanup_mounts, compile_sources, imgchain_export, log, machine_line,  # noqa: E402
                 parse_size, run, short_path, stop)

MARK = "<!-- bench/active.py: {} {} -->"  # begin/end, section
SECTION = "Block jobs: active commit and live snapshot against qemu-storage-daemon"
IDLE_SECONDS = 3.0  # fio alone before the job (the idle window: its last IDLE_SECONDS - 0.5 s)
SETTLE_SECONDS = 1.0  # between READY and complete, complete and snapshot, snapshot and the end
READY_TIMEOUT = 300.0
EVENT_TIMEOUT = 120.0
DEPTHS = ((1, "psync"), (16, "libaio"))


# -- QMP with deadlines -------------------------------------------------------------

class Qmp:
    """Commands, and events with a deadline (qsd and imgchain alike)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.receive(30)  # greeting
        self.execute("qmp_capabilities")

    def receive(self, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return None
            data = self.sock.recv(65536)
            if not data:
                raise RuntimeError("the daemon closed the QMP connection")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        self.sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        while True:
            reply = self.receive(EVENT_TIMEOUT)
            if reply is None:
                raise RuntimeError(f"{command}: no reply in {EVENT_TIMEOUT:.0f} s")
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise RuntimeError(f"{command}: {reply['error']['desc']}")
            elif "return" in reply:
                return reply["return"]

    def wait_event(self, names: tuple[str, ...], timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while True:
            if self.events:
                event = self.events.pop(0)
            else:
                event = self.receive(deadline - time.monotonic())
                if event is None:
                    return None
            if event.get("event") in names:
                return event

    def close(self) -> None:
        self.sock.close()


def scanned_length(qmp: Qmp) -> int:
    """The job's len once it has begun copying (offset > 0) or is READY:
    both jobs fill their dirty bitmap from the allocation first (QEMU's
    mirror_dirty_init), and len grows while they do. Polled every 10 ms."""
    deadline = time.monotonic() + EVENT_TIMEOUT
    while time.monotonic() < deadline:
        job = next((j for j in qmp.execute("query-block-jobs") if j["device"] == "job0"), None)
        if job is None or job["offset"] > 0 or job.get("ready"):
            return job["len"] if job else 0
        time.sleep(0.01)
    return 0


# -- exporters ----------------------------------------------------------------------
# (work directory, mount point, fio's engine) -> (QMP socket path, device for block-commit, what names
# the active node after the pivot for blockdev-snapshot-sync, fio's arguments naming the target and its engine)

@contextmanager
def imgchain_side(work: Path, mnt: Path, engine: str) -> Iterator[tuple[str, str, dict[str, str], list[str]]]:
    with imgchain_export(work / "top.qcow2", mnt):
        yield socket_of(mnt), "drive0", {"device": "drive0"}, [f"--filename={mnt}", f"--ioengine={engine}", "--direct=1"]


@contextmanager
def qsd_side(work: Path, mnt: Path, engine: str) -> Iterator[tuple[str, str, dict[str, str], list[str]]]:
    """qemu-storage-daemon: the chain's nodes named as imgchain names them, an NBD export of top
    (QEMU 7.2's writable FUSE export holds the resize permission, which an active commit refuses
    to share: "Permission conflict on node ...: permissions 'resize' are both required by an
    unnamed block device ... and unshared by commit job"), written by fio's nbd engine."""
    qmp_path = str(work / "qsd.qmp")
    nbd_path = str(work / "nbd.sock")
    log_path = work / "qsd.log"
    argv = ["qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=base-file,filename={work / 'base.raw'}",
            "--blockdev", "driver=raw,node-name=base,file=base-file",
            "--blockdev", f"driver=file,node-name=mid-file,filename={work / 'mid.qcow2'}",
            "--blockdev", "driver=qcow2,node-name=mid,file=mid-file,backing=base",
            "--blockdev", f"driver=file,node-name=top-file,filename={work / 'top.qcow2'}",
            "--blockdev", "driver=qcow2,node-name=top,file=top-file,backing=mid",
            "--nbd-server", f"addr.type=unix,addr.path={nbd_path}",
            "--export", "type=nbd,id=exp0,node-name=top,name=disk,writable=on",
            "--chardev", f"socket,id=qmp0,path={qmp_path},server=on,wait=off",
            "--monitor", "chardev=qmp0"]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
    try:
        deadline = time.monotonic() + 30
        while not (os.path.exists(nbd_path) and os.path.exists(qmp_path)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qemu-storage-daemon did not start: {log_path.read_text().strip()}")
            time.sleep(0.02)
        yield qmp_path, "top", {"node-name": "mid"}, ["--ioengine=nbd", f"--uri=nbd+unix:///disk?socket={nbd_path}"]
    finally:
        stop(proc, mnt)


SIDES: dict[str, Callable[[Path, Path, str], ContextManager[tuple[str, str, dict[str, str], list[str]]]]] = {
    "imgchain": imgchain_side, "qsd": qsd_side}


# -- one run ------------------------------------------------------------------------

@dataclass
class Window:
    max_ms: float
    p999_ms: float
    writes: int  # writes in flight at some moment of the window
    seconds: float  # the window's length (command to event or reply)


@dataclass
class Result:
    ready_s: float | None  # block-commit to BLOCK_JOB_READY (None: no READY within READY_TIMEOUT)
    copied: int  # the job's offset at READY: bytes it copied
    to_copy: int  # the job's length once its copy has begun: what was dirty at the start
    fio_iops: float  # fio's writes per second from the command to READY
    idle_iops: float  # fio's writes per second before the job
    idle: Window
    copy: Window  # from the command to READY (or to the timeout)
    pivot: Window | None
    snapshot: Window | None


def in_flight(writes: list[tuple[float, float]], start: float, end: float) -> list[float]:
    """Latencies (ms) of the writes in flight at some moment of [start, end] (wall-clock seconds)."""
    return [ms for t, ms in writes if t >= start and t - ms / 1000 <= end]


def window(writes: list[tuple[float, float]], start: float, end: float) -> Window:
    lat = in_flight(writes, start, end)
    if not lat:
        raise RuntimeError(f"fio logged no write in flight during a window of {end - start:.3f} s")
    return Window(max(lat), p999(lat), len(lat), end - start)


def one_run(work: Path, side: str, depth: int, engine: str, size: int, fio_size: int | None, rate: int,
            ready_timeout: float) -> Result:
    mnt = work / "disk"
    prefix = work / "fio-lat"
    with SIDES[side](work, mnt, engine) as (qmp_path, device, device_after, target):
        fio = subprocess.Popen(
            ["fio", "--name=active", *target, "--rw=randwrite", "--bs=4k",
             f"--iodepth={depth}", f"--size={fio_size or size}", "--time_based",
             "--runtime=3600", f"--write_lat_log={prefix}", "--log_unix_epoch=1", "--randrepeat=1",
             *([f"--rate_iops={rate}"] if rate else []),
             "--output-format=json", f"--output={work / 'fio.json'}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        qmp = Qmp(qmp_path)
        pivot = snap = None
        to_copy = copied = 0
        ready_s = None
        try:
            time.sleep(IDLE_SECONDS)
            if fio.poll() is not None:
                raise RuntimeError(f"fio exited early: {fio.stderr.read().decode().strip()}")  # type: ignore[union-attr]
            start = time.time()
            qmp.execute("block-commit", device=device, **{"base-node": "mid", "job-id": "job0"})
            to_copy = scanned_length(qmp)
            ready = qmp.wait_event(("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"),
                                   ready_timeout)
            ready_at = time.time()
            if ready is None:
                log(f"  {side} QD{depth}: no BLOCK_JOB_READY in {ready_timeout:.0f} s: cancelled")
                qmp.execute("block-job-cancel", device="job0", force=True)
                qmp.wait_event(("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"), EVENT_TIMEOUT)
            elif ready["event"] != "BLOCK_JOB_READY":
                raise RuntimeError(f"{side}: the active commit ended before READY: {ready}")
            else:
                ready_s, copied = ready_at - start, ready["data"]["offset"]
                time.sleep(SETTLE_SECONDS)
                c0 = time.time()
                qmp.execute("block-job-complete", device="job0")
                done = qmp.wait_event(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), EVENT_TIMEOUT)
                c1 = time.time()
                if done is None or done["event"] != "BLOCK_JOB_COMPLETED" or "error" in done["data"]:
                    raise RuntimeError(f"{side}: the pivot did not complete: {done}")
                if side == "qsd":  # the monitor still holds the old top (a --blockdev), over mid: let go
                    qmp.execute("blockdev-del", **{"node-name": "top"})
                    qmp.execute("blockdev-del", **{"node-name": "top-file"})
                time.sleep(SETTLE_SECONDS)
                s0 = time.time()
                qmp.execute("blockdev-snapshot-sync", **device_after,
                            **{"snapshot-file": str(work / "snap.qcow2"), "snapshot-node-name": "snap", "format": "qcow2",
                               "mode": "absolute-paths"})
                s1 = time.time()
                time.sleep(SETTLE_SECONDS)
                pivot, snap = (c0, c1), (s0, s1)
        finally:
            qmp.close()
            fio.send_signal(signal.SIGINT)
            fio.wait(timeout=60)
    writes = read_lat_log(Path(f"{prefix}_clat.1.log"))
    for log_file in work.glob("fio-lat_*.log"):
        log_file.unlink()
    first = writes[0][0] if writes else start
    idle_lat = [(t, ms) for t, ms in writes if first + 0.5 <= t < start]
    if not idle_lat:
        raise RuntimeError("fio logged no write before the job")
    idle = Window(max(ms for _, ms in idle_lat), p999([ms for _, ms in idle_lat]), len(idle_lat),
                  start - first - 0.5)
    end = start + ready_s if ready_s is not None else ready_at
    during = sum(1 for t, _ in writes if start <= t < end)
    return Result(ready_s, copied, to_copy, during / (end - start), idle.writes / idle.seconds, idle,
                  window(writes, start, end), window(writes, *pivot) if pivot else None, window(writes, *snap) if snap else None)


def verify(work: Path) -> None:
    """mid.qcow2 and snap.qcow2 check clean, and snap.qcow2's backing is mid.qcow2."""
    for name in ("mid.qcow2", "snap.qcow2"):
        run(["qemu-img", "check", "-q", str(work / name)])
    info = json.loads(run(["qemu-img", "info", "--output", "json", str(work / "snap.qcow2")]).stdout)
    backing = info.get("backing-filename") or ""  # qsd names it json:{... "filename": ".../mid.qcow2"}}
    if os.path.basename(backing) != "mid.qcow2" and f'{work / "mid.qcow2"}"' not in backing:
        raise RuntimeError(f"snap.qcow2's backing file is {backing!r}, not 'mid.qcow2'")


# -- report -------------------------------------------------------------------------

def med(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def table(results: dict[tuple[int, str], list[Result]]) -> str:
    rows = ["| fio | exporter | time to READY, s | copied by READY, MiB | dirty at start, MiB | copy MB/s "
            "| imgchain/qsd copy MB/s | qsd/imgchain time to READY | fio write IOPS idle | fio write IOPS to READY |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for depth, _ in DEPTHS:
        for side in SIDES:
            rs = results.get((depth, side), [])
            if not rs:
                continue
            ok = [r for r in rs if r.ready_s is not None]
            rate = [r.copied / r.ready_s / 1e6 for r in ok]  # type: ignore[operator]
            if side == "qsd":
                ratio = time_ratio = "1 (reference)"
            else:
                pairs = list(zip(rs, results.get((depth, "qsd"), [])))
                good = [(a, b) for a, b in pairs if a.ready_s and b.ready_s]
                ratio = med([(a.copied / a.ready_s) / (b.copied / b.ready_s) for a, b in good], 2)  # type: ignore
                time_ratio = med([b.ready_s / a.ready_s for a, b in good], 2)  # type: ignore[operator]
            missing = f" ({len(rs) - len(ok)} of {len(rs)} never READY)" if len(ok) < len(rs) else ""
            rows.append(f"| QD{depth} | {side} | {med([r.ready_s for r in ok], 2)}{missing} "  # type: ignore[misc]
                        f"| {med([r.copied / 2**20 for r in ok], 0)} | {med([r.to_copy / 2**20 for r in rs], 0)} "
                        f"| {med(rate, 0)} | {ratio} | {time_ratio} | {med([r.idle_iops for r in rs], 0)} "
                        f"| {med([r.fio_iops for r in rs], 0)} |")
    return "\n".join(rows)


def stall_table(results: dict[tuple[int, str], list[Result]]) -> str:
    rows = ["| fio | exporter | copy to READY: longest write, ms | copy: p99.9, ms | pivot: longest write, ms | pivot: p99.9, ms | pivot: complete to COMPLETED, ms "
            "| snapshot: longest write, ms | snapshot: p99.9, ms | snapshot: command to reply, ms "
            "| idle: longest write, ms | idle: p99.9, ms |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for depth, _ in DEPTHS:
        for side in SIDES:
            rs = results.get((depth, side), [])
            if not rs:
                continue
            pv = [r.pivot for r in rs if r.pivot]
            sn = [r.snapshot for r in rs if r.snapshot]
            rows.append(f"| QD{depth} | {side} | {med([r.copy.max_ms for r in rs], 1)} "
                        f"| {med([r.copy.p999_ms for r in rs], 1)} | {med([w.max_ms for w in pv], 1)} | {med([w.p999_ms for w in pv], 1)} "
                        f"| {med([w.seconds * 1000 for w in pv], 1)} | {med([w.max_ms for w in sn], 1)} "
                        f"| {med([w.p999_ms for w in sn], 1)} | {med([w.seconds * 1000 for w in sn], 1)} "
                        f"| {med([r.idle.max_ms for r in rs], 1)} | {med([r.idle.p999_ms for r in rs], 2)} |")
    return "\n".join(rows)


def report(results: dict[tuple[int, str], list[Result]], args: argparse.Namespace, command: str,
           machine: str) -> str:
    runs = f"{args.repeat} runs" if args.repeat > 1 else "one run"
    region = f"the first {args.fio_size} of the disk" if args.fio_size else "the whole disk"
    return "\n".join([
        f"### {SECTION}", "",
        f"Measured {machine}.", "",
        f"Chain: base.raw ({args.size}, fully written with random data) <- mid.qcow2 <- top.qcow2, 64 KiB "
        f"clusters, a random quarter of each overlay's clusters rewritten. Each run starts from a fresh copy "
        f"of the chain (written out, then read into the page cache) and exports top.qcow2: `imgchain mount`, "
        f"written by fio `--direct=1` through FUSE (QD1: psync; QD16: libaio --iodepth=16); or "
        f"`qemu-storage-daemon` with the blockdevs base, mid, top (defaults), a QMP monitor and a writable "
        f"**NBD** export of top on a Unix socket, written by fio's nbd engine (--iodepth=1 or 16). qsd cannot "
        f"do this through its FUSE export: QEMU 7.2's writable FUSE export holds the 'resize' permission and "
        f"block-commit of the active layer refuses to share it (\"Permission conflict on node '#block078': "
        f"permissions 'resize' are both required by an unnamed block device (uses node '#block078' as "
        f"'root' child) and unshared by commit job 'job0'\"), so qsd's figures are through NBD, one "
        f"round trip over a socket per request instead of FUSE's. fio writes 4 KiB at random over {region}, "
        + (f"at most {args.fio_rate} writes per second (`--rate_iops={args.fio_rate}`: the same load on both "
           f"exporters, whose unthrottled speeds differ by transport; `--fio-rate 0` lets fio go as fast as "
           f"each goes), " if args.fio_rate else "as fast as each exporter goes (`--fio-rate 0`), ")
        + f"every write's completion latency logged. After "
        f"{IDLE_SECONDS:.0f} s: `block-commit device=<top> base-node=mid job-id=job0` (the active commit "
        f"of top into mid), timed to BLOCK_JOB_READY; {SETTLE_SECONDS:.0f} s later `block-job-complete` (the "
        f"pivot onto mid), timed to BLOCK_JOB_COMPLETED; {SETTLE_SECONDS:.0f} s later `blockdev-snapshot-sync` "
        f"of mid into a new snap.qcow2 (mode absolute-paths), timed to its reply. Nothing is pinned. "
        f"Each figure is the median of {runs} (min-max); imgchain and qsd run back to back within a "
        f"repetition, and the ratios are computed run by run. \"Copied by READY\" is the job's offset in "
        f"BLOCK_JOB_READY (bytes copied, fio's rewrites included), \"dirty at start\" its length once the copy has "
        f"begun (both fill their dirty bitmap from the allocation first); copy MB/s is copied / time to READY.", "",
        table(results), "",
        "Stall: over the writes in flight at some moment of the window (issued before its end, completed "
        "after its start): the copy is block-commit to BLOCK_JOB_READY, the pivot is block-job-complete to BLOCK_JOB_COMPLETED, the snapshot the "
        f"command to its reply; idle is fio alone in the {IDLE_SECONDS - 0.5:.1f} s before the job.", "",
        stall_table(results), "",
        "Command:", "", "```sh", command, "```",
    ])


# -- main -----------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1G", help="virtual size of the chain (default 1G)")
    p.add_argument("--repeat", type=int, default=3, help="runs of every measurement (default 3)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the chain's content")
    p.add_argument("--fio-size", help="fio writes only the first SIZE of the disk (default: all of it)")
    p.add_argument("--fio-rate", type=int, default=2000,
                   help="fio's writes per second (--rate_iops; default 2000; 0: as fast as the mount goes)")
    p.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT,
                   help=f"seconds a job may take to READY before it is cancelled (default {READY_TIMEOUT:.0f})")
    p.add_argument("--depths", default="1,16", help="fio queue depths to run, of 1 and 16 (default both)")
    p.add_argument("--no-verify", action="store_true", help="skip qemu-img check of mid and snap after each run")
    p.add_argument("--out", type=Path, help="also write the result into this Markdown file")
    p.add_argument("--tmpdir", help="where to build the chain (default: the system's temp dir)")
    args = p.parse_args()
    size = parse_size(args.size)
    fio_size = parse_size(args.fio_size) if args.fio_size else None
    depths = [d for d in DEPTHS if str(d[0]) in args.depths.split(",")]
    command = shlex.join([short_path(sys.executable), short_path(__file__), *sys.argv[1:]])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work_root = Path(tempfile.mkdtemp(prefix="imgchain-bench-active-", dir=args.tmpdir))
    os.environ["IMGCHAIN_RUNTIME_DIR"] = str(work_root / "run")
    compile_sources()
    machine, load_start = machine_line(), loadavg()
    results: dict[tuple[int, str], list[Result]] = {}
    try:
        orig = build_original(work_root, size, args.seed)
        for i in range(args.repeat):
            log(f"-- repetition {i + 1} of {args.repeat}")
            for depth, engine in depths:
                for side in SIDES:
                    work = work_root / "w"
                    fresh_copy(orig, work)
                    r = one_run(work, side, depth, engine, size, fio_size, args.fio_rate, args.ready_timeout)
                    results.setdefault((depth, side), []).append(r)
                    pv, sn = r.pivot, r.snapshot
                    log(f"QD{depth:<2} {side:8} READY {r.ready_s or float('nan'):6.2f} s, copied "
                        f"{r.copied / 2**20:6.0f} of {r.to_copy / 2**20:.0f} MiB dirty at start, fio "
                        f"{r.fio_iops:,.0f} IOPS (idle {r.idle_iops:,.0f}); pivot "
                        + (f"{pv.seconds * 1000:.1f} ms, max {pv.max_ms:.1f} p99.9 {pv.p999_ms:.1f}" if pv else "-")
                        + "; snapshot "
                        + (f"{sn.seconds * 1000:.1f} ms, max {sn.max_ms:.1f} p99.9 {sn.p999_ms:.1f}" if sn else "-")
                        + f"; copy max {r.copy.max_ms:.1f} p99.9 {r.copy.p999_ms:.1f}; idle max {r.idle.max_ms:.1f} p99.9 {r.idle.p999_ms:.2f}")
                    if not args.no_verify and pv:
                        verify(work)
                    shutil.rmtree(work)
    except BaseException:
        for log_file in sorted((work_root / "run").glob("*.log")):
            log(f"--- {log_file.name} (last lines)\n" + "".join(log_file.read_text().splitlines(True)[-20:]))
        raise
    finally:
        cleanup_mounts(work_root)
        shutil.rmtree(work_root, ignore_errors=True)
    machine += f"; load average (1, 5, 15 min) {load_start} at the start, {loadavg()} at the end"
    body = report(results, args, command, machine)
    print(body)
    if args.out:
        write_out(args.out, body, SECTION, MARK)


if __name__ == "__main__":
    main()
