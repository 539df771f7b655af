"""`map --output json` and deep chains against qemu-img.

Builds, in a temporary directory:

- a three-layer qcow2 chain of --size (64 KiB clusters) written by qemu-io
  with random 4 KiB writes and 64 KiB zero writes (seeded; tens of thousands
  of map extents at 4 GiB), and times `imgchain map --output json` against
  `qemu-img map --output=json` after checking that both print the same bytes;
- a chain of --depth layers (a sparse raw base, one cluster written in every
  third layer, 4 KiB clusters, 1 MiB virtual), built with imgchain's create
  API, and times map, check and compare (against its raw copy) and, on a
  fresh copy each run, an offline stream (against `qemu-img rebase -b ''`)
  and a commit into the base (against `qemu-img commit -b`). qemu-img's
  opening of a deep chain is quadratic in its depth: at 2000 layers one
  qemu-img command takes tens of seconds.

Figures are medians of wall-clock and CPU seconds of whole processes, the
tools alternating; ratios are imgchain / qemu-img run by run, then the
median (min-max). Prints a Markdown table; with --out, also puts it in its
own section of BENCHMARKS.md. Not a test.

    .venv/bin/python bench/depth.py [--size 4G] [--writes 16000] [--depth 2000] [--repeat 3] [--quick] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from jobs import loadavg, write_out  # noqa: E402
from offline import TABLE_HEAD, Pair, measure, row  # noqa: E402
from run import IMGCHAIN, log, machine_line, run, short_path  # noqa: E402

from tests.test_depth import build_deep_chain  # noqa: E402

MARK = "<!-- bench/depth.py: {} {} -->"  # begin/end, section
SECTION = "map --output json and deep chains, against qemu-img"
UNITS = {"M": 1 << 20, "G": 1 << 30}


def written_chain(work: Path, size: int, writes: int, seed: int) -> Path:
    """base <- mid <- top (qcow2), each with `writes` random 4 KiB writes (a tenth are
    64 KiB zero writes) by qemu-io; returns top."""
    rng = random.Random(seed)
    below = None
    for name in ("base", "mid", "top"):
        path = work / f"{name}.qcow2"
        backing = ["-b", f"{below}.qcow2", "-F", "qcow2"] if below else []
        run(["qemu-img", "create", "-q", "-f", "qcow2", *backing, str(path), str(size)])
        lines = []
        for _ in range(writes):
            offset = rng.randrange(size >> 12) << 12
            lines.append(f"write -z {offset >> 16 << 16} 64k\n" if below and rng.random() < 0.1
                         else f"write -P {rng.randrange(1, 255)} {offset} 4k\n")
        start = time.monotonic()
        proc = subprocess.run(["qemu-io", "-t", "unsafe", "-f", "qcow2", str(path)], input="".join(lines),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"qemu-io on {path} failed: {proc.stderr.strip()}")
        log(f"{path.name}: {writes} writes in {time.monotonic() - start:.1f} s")
        below = name
    return work / "top.qcow2"


def same_map_output(top: Path) -> int:
    """imgchain's map JSON is qemu-img's, byte for byte; returns the number of entries."""
    ours = run([IMGCHAIN, "map", "--output", "json", top.name], cwd=top.parent).stdout
    theirs = run(["qemu-img", "map", "--output=json", top.name], cwd=top.parent).stdout
    if ours != theirs:
        raise RuntimeError(f"map --output json of {top} differs from qemu-img's")
    return theirs.count("\n")


def fresh(src: Path, dst: Path):  # type: ignore[no-untyped-def]
    def copy() -> None:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
    return copy


def deep_pairs(work: Path, depth: int) -> list[Pair]:
    chain = build_deep_chain(work / "deep", depth)
    top, base = chain.top.name, "l0000.raw"
    model = chain.model_file()
    run_dir = work / "run"
    copy = fresh(chain.folder, run_dir)
    return [
        Pair(f"map --output json, {depth} layers", [IMGCHAIN, "map", "--output", "json", f"deep/{top}"],
             ["qemu-img", "map", "--output=json", f"deep/{top}"]),
        Pair(f"check, {depth} layers", [IMGCHAIN, "check", f"deep/{top}"], ["qemu-img", "check", f"deep/{top}"]),
        Pair(f"compare with its raw copy, {depth} layers", [IMGCHAIN, "compare", f"deep/{top}", str(model)],
             ["qemu-img", "compare", f"deep/{top}", str(model)]),
        Pair(f"stream offline (qemu-img rebase -b ''), {depth} layers", [IMGCHAIN, "stream", "-q", f"run/{top}"],
             ["qemu-img", "rebase", "-b", "", f"run/{top}"], copy),
        Pair(f"commit into the base, {depth} layers",
             [IMGCHAIN, "commit", "-q", "--base", str(run_dir / base), f"run/{top}"],
             ["qemu-img", "commit", "-b", str(run_dir / base), f"run/{top}"], copy),
    ]


def report(pairs: list[Pair], entries: int, args: argparse.Namespace, command: str, machine: str,
           loads: tuple[str, str]) -> str:
    return "\n".join([
        f"### {SECTION}", "",
        f"Measured {machine}. Load average at start {loads[0]}, at end {loads[1]}.", "",
        f"map: base <- mid <- top, qcow2 of {args.size}, 64 KiB clusters, {args.writes} random 4 KiB writes "
        f"by qemu-io in each (a tenth 64 KiB zero writes above the base; seed {args.seed}): {entries} map "
        f"entries, printed byte for byte alike by both tools. Deep chain: {args.depth} layers "
        f"(tests/test_depth.py's shape). Medians of {args.repeat} runs (deep chain: {args.deep_repeat}), the "
        f"two tools alternating; ratios are imgchain / qemu-img run by run, then the median (min-max).", "",
        TABLE_HEAD, *(row(p) for p in pairs), "",
        "Command:", "", "```sh", command, "```",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="4G", help="virtual size of the map chain (default 4G)")
    p.add_argument("--writes", type=int, default=16000, help="random writes per layer of the map chain")
    p.add_argument("--depth", type=int, default=2000, help="layers of the deep chain (default 2000; 0: none)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the writes")
    p.add_argument("--repeat", type=int, default=5, help="runs of the map measurement (default 5)")
    p.add_argument("--deep-repeat", type=int, default=1, help="runs of each deep-chain measurement (default 1)")
    p.add_argument("--quick", action="store_true", help="1 GiB, 4000 writes, 300 layers, one run each")
    p.add_argument("--out", type=Path, help="also write the result into this Markdown file")
    args = p.parse_args()
    if args.quick:
        args.size, args.writes, args.depth, args.repeat, args.deep_repeat = "1G", 4000, 300, 1, 1
    size = int(args.size[:-1]) * UNITS[args.size[-1].upper()]
    command = shlex.join([short_path(sys.executable), short_path(__file__), *sys.argv[1:]])
    machine, load_start = machine_line(), loadavg()
    with tempfile.TemporaryDirectory(prefix="imgchain-depth-") as tmp:
        work = Path(tmp)
        top = written_chain(work, size, args.writes, args.seed)
        entries = same_map_output(top)
        pairs = [Pair(f"map --output json, 3 layers of {args.size}, {entries} entries",
                      [IMGCHAIN, "map", "--output", "json", top.name], ["qemu-img", "map", "--output=json", top.name])]
        log(f"timing {pairs[0].name}")
        measure(pairs[0], work, args.repeat)
        if args.depth:
            for pair in deep_pairs(work, args.depth):
                log(f"timing {pair.name}")
                measure(pair, work, args.deep_repeat)
                pairs.append(pair)
    body = report(pairs, entries, args, command, machine, (load_start, loadavg()))
    print(body)
    if args.out:
        write_out(args.out, body, SECTION, MARK)


if __name__ == "__main__":
    main()
