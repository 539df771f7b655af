"""Scale: deep chains and huge images through a mount, against one layer and qemu-storage-daemon.

Two measures, each run --repeat times, exporters interleaved run by run:

- `deep`: reads through a chain of --layers layers (a raw base of --size
  fully written with random data, then qcow2 overlays each rewriting a few
  random clusters, testimages/build_chain.py) against the same content in one
  layer (`qemu-img convert -O qcow2` of the chain): fio 4 KiB random reads at
  queue depth 1 (psync) and 16 (libaio), --runtime seconds after --ramp, each
  exporter's files read into the page cache first and the mounted file read
  once whole (dd, 1 MiB direct reads: the first touch, which fills the maps). The figure is deep IOPS /
  one-layer IOPS, run by run, then the median. With --pin, fio and the
  daemon run on that CPU (as bench/run.py --pin).
- `memory`: the daemon's peak RSS (VmHWM of /proc/PID/status) after
  --runtime seconds of fio 4 KiB random reads and writes (50/50, libaio, queue
  depth 16) over the whole virtual size of a fresh two-layer qcow2 chain of
  --huge (default 1T) and of a --layers deep one (16 GiB, a table of every
  layer in every 512 MiB), for imgchain at its default
  --cache-size and at each size in --cache-sizes, and for qemu-storage-daemon
  (qcow2 defaults, FUSE export) on the same chain.

Prints Markdown tables; with --out also writes them into BENCHMARKS.md (a
section of its own). Not a test.

    .venv/bin/python bench/scale.py deep [--layers 256] [--size 1G] [--pin 0] [--repeat 3]
    .venv/bin/python bench/scale.py memory [--huge 1T,16T] [--layers 64] [--cache-sizes 2M]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import run as bench  # bench/run.py: exporters, fio, pinning, the section writer
from imgchain.chain import open_image

sys.path.insert(0, str(bench.BENCH.parent / "testimages"))
import build_chain  # noqa: E402

READ_JOBS = [bench.Job("4k randread qd1 psync", "randread", "4k", "psync", 1),
             bench.Job("4k randread qd16 libaio", "randread", "4k", "libaio", 16)]
L2_SPAN = 512 << 20  # guest bytes one L2 table of 64 KiB clusters maps
MIXED = bench.Job("4k randrw qd16 libaio", "randrw", "4k", "libaio", 16)


def median_ratio(pairs: list[tuple[float, float]]) -> str:
    ratios = sorted(a / b for a, b in pairs if b)
    return f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})" if ratios else "-"


# -- deep ---------------------------------------------------------------------

def build_deep(work: Path, layers: int, size: int) -> tuple[Path, Path]:
    """The chain (its top) and its one-layer copy."""
    bench.log(f"building a {layers}-layer chain of {size >> 20} MiB")
    top = Path(build_chain.build(str(work / "deep"), layers, size, bench.CLUSTER,
                                 fraction=16 / (size // bench.CLUSTER) if layers > 64 else 0.01,
                                 raw_base=True, seed=1))
    flat = work / "flat.qcow2"
    bench.run(["qemu-img", "convert", "-O", "qcow2", str(top), str(flat)])
    return top, flat


def chain_files(top: Path) -> list[Path]:
    info = json.loads(bench.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(top)]).stdout)
    return [Path(i["filename"]) for i in info]


def cpu_seconds(pid: int) -> float:
    """User and system time of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_iops(image: Path, files: list[Path], job: bench.Job, size: int, runtime: int,
              ramp: int) -> tuple[float, float]:
    """IOPS, and the daemon's CPU time per request in µs (ramp included: an upper bound)."""
    bench.warm(files)
    mnt = image.parent.parent / "mnt"
    with bench.imgchain_export(image, mnt) as pid:
        bench.run(["dd", f"if={mnt}", "of=/dev/null", "bs=1M", "iflag=direct", "status=none"])  # first touch
        before = cpu_seconds(pid)
        iops = bench.run_fio(job, mnt, size, runtime, ramp).iops
        return iops, (cpu_seconds(pid) - before) * 1e6 / (iops * (runtime + ramp))


def deep(args: argparse.Namespace, work: Path) -> str:
    top, flat = build_deep(work, args.layers, args.size)
    files = {top: chain_files(top), flat: [flat]}
    results: dict[str, list[tuple[float, float]]] = {j.name: [] for j in READ_JOBS}
    cpu: dict[str, list[tuple[float, float]]] = {j.name: [] for j in READ_JOBS}
    for r in range(args.repeat):
        for job in READ_JOBS:
            d, d_cpu = read_iops(top, files[top], job, args.size, args.runtime, args.ramp)
            f, f_cpu = read_iops(flat, files[flat], job, args.size, args.runtime, args.ramp)
            bench.log(f"run {r + 1} {job.name}: {args.layers} layers {d:,.0f} IOPS ({d_cpu:.1f} µs CPU), "
                      f"one layer {f:,.0f} IOPS ({f_cpu:.1f} µs CPU)")
            results[job.name].append((d, f))
            cpu[job.name].append((f_cpu, d_cpu))
    rows = [f"| {name} | {statistics.median(p[0] for p in pairs):,.0f} | "
            f"{statistics.median(p[1] for p in pairs):,.0f} | {median_ratio(pairs)} | "
            f"{statistics.median(c[1] for c in cpu[name]):.1f} | {statistics.median(c[0] for c in cpu[name]):.1f} | "
            f"{median_ratio(cpu[name])} |"
            for name, pairs in results.items()]
    pin = f"fio and the daemon pinned to CPU {args.pin}" if args.pin is not None else "not pinned"
    return "\n".join([
        f"### Deep chain: {args.layers} layers against one\n",
        f"Measured {bench.machine_line()}\n",
        f"Chain: a raw base of {args.size >> 20} MiB fully written with random data and "
        f"{args.layers - 1} qcow2 overlays (64 KiB clusters) each rewriting a few random clusters "
        f"(testimages/build_chain.py); one layer: `qemu-img convert -O qcow2` of it. fio --direct=1, "
        f"{args.runtime} s after {args.ramp} s of ramp, files read into the page cache first and the "
        f"mounted file read once whole before fio (dd, 1 MiB direct: the first touch); {pin}. "
        f"Median of {args.repeat} runs; the ratios are taken run by run (median, min-max). CPU: the "
        f"daemon's user and system time (/proc/PID/stat) over fio's run, ramp included, per request; "
        f"steadier than IOPS when other processes share the CPU.\n",
        f"| job | {args.layers} layers IOPS | one layer IOPS | {args.layers} layers / one layer IOPS | "
        f"{args.layers} layers CPU µs/request | one layer CPU µs/request | one layer / {args.layers} layers CPU |",
        "|---|---:|---:|---:|---:|---:|---:|", *rows, "", "Command:", "", "```sh",
        f".venv/bin/python bench/scale.py {' '.join(sys.argv[1:])}", "```"])


# -- memory -------------------------------------------------------------------

def peak_rss(pid: int, run: Callable[[], object]) -> tuple[int, int]:
    """(RSS before, VmHWM after) of process `pid` around `run()`, in bytes."""
    def field(name: str) -> int:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(name + ":"))
    before = field("VmRSS")
    run()
    return before, field("VmHWM")


def build_huge(work: Path, size: str, layers: int) -> Path:
    """A fresh chain of `layers` qcow2 images of virtual size `size`. Two layers are empty; a
    deeper chain has one 4 KiB write per layer in every 512 MiB (one L2 table's range), so that
    a read anywhere resolves through an L2 table of every layer."""
    below = None
    for i in range(layers):
        image = work / f"huge{i}.qcow2"
        backing = ["-b", str(below), "-F", "qcow2"] if below else []
        bench.run(["qemu-img", "create", "-q", "-f", "qcow2", *backing, str(image), size])
        if layers > 2:
            node = open_image(str(image), writable=True)
            try:
                for span in range(0, node.size, L2_SPAN):
                    node.write(span + i * bench.CLUSTER, bytes([i + 1]) * 4096)
            finally:
                node.close()
        below = image
    assert below is not None
    return below


@contextmanager
def imgchain_sized(cache_size: str | None) -> Iterator[Callable[[Path, Path], ContextManager[int]]]:
    """bench.imgchain_export with --cache-size (None: the default)."""
    @contextmanager
    def export(image: Path, mnt: Path) -> Iterator[int]:
        options = ["--cache-size", cache_size] if cache_size else []
        bench.run([*bench.PIN, bench.IMGCHAIN, "mount", *options, str(image), str(mnt)], cwd=image.parent)
        try:
            records = json.loads(bench.run([bench.IMGCHAIN, "mounts", "--output", "json"]).stdout)
            yield next(r["pid"] for r in records if r["mountpoint"] == os.path.realpath(mnt))
        finally:
            subprocess.run([bench.IMGCHAIN, "unmount", str(mnt)], capture_output=True)
            bench.force_unmount(mnt)
    yield export


def memory_run(work: Path, size: str, layers: int, exporter: str, cache_size: str | None,
               runtime: int) -> tuple[int, int, float]:
    chain = work / f"m-{size}-{layers}"
    shutil.rmtree(chain, ignore_errors=True)
    chain.mkdir()
    top = build_huge(chain, size, layers)
    mnt = chain / "mnt"
    out: list[float] = []

    def fio() -> None:
        argv = ["fio", "--name=mixed", f"--filename={mnt}", *MIXED.fio_args(), "--direct=1", "--time_based",
                f"--runtime={runtime}", "--randrepeat=1", "--output-format=json"]
        data = bench.run(argv, timeout=runtime + 300).stdout
        job = json.loads(data[data.index("{"):])["jobs"][0]
        out.append(job["read"]["iops"] + job["write"]["iops"])

    with imgchain_sized(cache_size) as export_imgchain:
        export = export_imgchain if exporter == "imgchain" else bench.qsd_export
        with export(top, mnt) as pid:
            before, peak = peak_rss(pid, fio)
    shutil.rmtree(chain, ignore_errors=True)
    return before, peak, out[0]


def memory(args: argparse.Namespace, work: Path) -> str:
    cases = [(s, 2) for s in args.huge.split(",")] + [("16G", args.layers)]
    sides = [("imgchain", None)] + [("imgchain", c) for c in args.cache_sizes.split(",") if c] + [("qsd", None)]
    rows = []
    for size, layers in cases:
        for exporter, cache in sides:
            runs = [memory_run(work, size, layers, exporter, cache, args.runtime) for _ in range(args.repeat)]
            before = statistics.median(r[0] for r in runs) / 2**20
            peak = max(r[1] for r in runs) / 2**20
            iops = statistics.median(r[2] for r in runs)
            name = exporter + (f" --cache-size {cache}" if cache else "")
            bench.log(f"{size} x{layers} {name}: RSS {before:.1f} MiB at start, peak {peak:.1f} MiB, {iops:,.0f} IOPS")
            rows.append(f"| {size}, {layers} layers | {name} | {before:.1f} | {peak:.1f} | {iops:,.0f} |")
    return "\n".join([
        "### Memory: the daemon's peak RSS\n",
        f"Measured {bench.machine_line()}\n",
        f"Each run: a fresh chain of qcow2 images (64 KiB clusters): two empty layers of each size in "
        f"--huge, and {args.layers} layers of 16 GiB, each with one 4 KiB write in every 512 MiB (so every "
        f"read resolves through {args.layers} L2 tables: {args.layers * 32 * 64 // 1024} MiB of them in "
        f"all). fio 4 KiB random reads and writes "
        f"(--rw=randrw, libaio, queue depth 16, --direct=1) over the whole virtual size for {args.runtime} s; "
        f"RSS from /proc/PID/status (VmRSS after the mount, VmHWM after fio: the highest over the "
        f"{args.repeat} runs). qsd: qemu-storage-daemon with the qcow2 defaults and a FUSE export of the top.\n",
        "| chain | exporter | RSS at start, MiB | peak RSS, MiB | IOPS (reads + writes) |",
        "|---|---|---:|---:|---:|", *rows, "", "Command:", "", "```sh",
        f".venv/bin/python bench/scale.py {' '.join(sys.argv[1:])}", "```"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("measure", choices=["deep", "memory"])
    p.add_argument("--layers", type=int, help="layers of the deep chain (deep: 256, memory: 64)")
    p.add_argument("--size", type=bench.parse_size, default=1 << 30, help="deep: virtual size (default 1G)")
    p.add_argument("--huge", default="1T", help="memory: virtual sizes of the two-layer chains (default 1T)")
    p.add_argument("--cache-sizes", default="2M", help="memory: --cache-size values to run besides the default")
    p.add_argument("--runtime", type=int, default=10)
    p.add_argument("--ramp", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--pin", type=int, metavar="CPU", help="run fio and the daemons on this CPU")
    p.add_argument("--tmpdir", help="where to build the chains (default: the system's temp dir)")
    p.add_argument("--out", type=Path, help="also write the result into this Markdown file")
    args = p.parse_args()
    if args.layers is None:
        args.layers = 256 if args.measure == "deep" else 64
    if args.pin is not None:
        bench.PIN[:] = ["taskset", "-c", str(args.pin)]
    work = Path(tempfile.mkdtemp(prefix="imgchain-scale-", dir=args.tmpdir))
    try:
        body = deep(args, work) if args.measure == "deep" else memory(args, work)
    finally:
        bench.cleanup_mounts(work)
        shutil.rmtree(work, ignore_errors=True)
    print(body)
    if args.out:
        name = f"Deep chain ({args.layers} layers)" if args.measure == "deep" else "Memory"
        bench.write_out(args.out, body, name)


if __name__ == "__main__":
    main()
