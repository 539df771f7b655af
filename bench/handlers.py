"""The CPU cost of one request in imgchain's FUSE handlers, without FUSE: µs per call.

Builds the chain of bench/run.py, opens it as `imgchain mount` does (a Daemon:
chain, locks, BlockBackend) and calls the export's `read`/`write` handlers
directly in a trio loop, next to a bare handler doing one os.pread/os.pwrite
on a raw copy (what bench/passthrough.py does per request). Through FUSE a
request also costs pyfuse3, trio and the kernel round trip (bench/profile.py
shows them); this isolates the part imgchain controls. Not a test.

    .venv/bin/python bench/handlers.py [--size 1G] [--count 20000]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable

import trio

import run as bench  # bench/run.py: the chain
from imgchain.daemon import Daemon
from imgchain.fuse.export import BlockExport

KIB = 1024


async def per_call(call: Callable[[int], Awaitable[object]], offsets: list[int]) -> float:
    os.sync()  # start without dirty pages: the kernel's writeback would throttle the writes
    t0 = time.perf_counter()
    for off in offsets:
        await call(off)
    return (time.perf_counter() - t0) / len(offsets) * 1e6


def allocated_in_top(export: BlockExport, offset: int) -> bool:
    return bool(export.backend.root.driver.l2_entry(offset) & 0x00FFFFFFFFFFFE00)  # type: ignore[attr-defined]


async def measure(work: Path, size: int, count: int, rng: random.Random) -> list[tuple[str, float, float]]:
    daemon = Daemon(str(work / "w-top.qcow2"))
    export = BlockExport(daemon.backend, read_only=False)
    fd = os.open(work / "chain.raw", os.O_RDWR)
    block, big = 4 * KIB, 1024 * KIB
    buf4, buf1m = rng.randbytes(block), rng.randbytes(big)
    randoms = [rng.randrange(size // block) * block for _ in range(count)]
    seq = [(i * big) % size for i in range(max(64, count // 64))]
    fresh = [o for o in randoms if not allocated_in_top(export, o)]
    fresh = list({o // 65536: o for o in fresh}.values())[:count // 4]  # one per cluster
    rows = []
    try:
        async def bare_read(off: int, n: int = block) -> bytes:
            return os.pread(fd, n, off)

        async def bare_write(off: int, data: bytes = buf4) -> int:
            return os.pwrite(fd, data, off)

        rows.append(("4k random read", await per_call(lambda o: export.read(1, o, block), randoms),
                     await per_call(bare_read, randoms)))
        rows.append(("4k write, cluster unallocated in top (COW)",
                     await per_call(lambda o: export.write(1, o, buf4), fresh),
                     await per_call(bare_write, fresh)))
        rows.append(("4k write, cluster allocated in top (in place)",
                     await per_call(lambda o: export.write(1, o, buf4), fresh),
                     await per_call(bare_write, fresh)))
        rows.append(("1M sequential read", await per_call(lambda o: export.read(1, o, big), seq),
                     await per_call(lambda o: bare_read(o, big), seq)))
        rows.append(("1M sequential write (first pass: allocating)",
                     await per_call(lambda o: export.write(1, o, buf1m), seq),
                     await per_call(lambda o: bare_write(o, buf1m), seq)))
        rows.append(("1M sequential write (second pass: in place)",
                     await per_call(lambda o: export.write(1, o, buf1m), seq),
                     await per_call(lambda o: bare_write(o, buf1m), seq)))
    finally:
        os.close(fd)
        daemon.close()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1G")
    p.add_argument("--count", type=int, default=20000, help="4 KiB requests per row")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    size = bench.parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="imgchain-handlers-"))
    try:
        bench.build_chain(work, size, args.seed)
        shutil.copyfile(work / "top.qcow2", work / "w-top.qcow2")
        bench.run(["qemu-img", "convert", "-O", "raw", str(work / "top.qcow2"), str(work / "chain.raw")])
        bench.warm([work / name for name in ("w-top.qcow2", "mid.qcow2", "base.raw", "chain.raw")])
        rows = trio.run(measure, work, size, args.count, random.Random(args.seed))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| request | imgchain handler µs | bare pread/pwrite handler µs | difference µs |")
    print("|---|---:|---:|---:|")
    for name, ours, bare in rows:
        print(f"| {name} | {ours:,.1f} | {bare:,.1f} | {ours - bare:,.1f} |")


if __name__ == "__main__":
    main()
