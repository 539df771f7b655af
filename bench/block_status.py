"""Time `Qcow2Driver.block_status(0, size)` on a fully allocated qcow2 image.

The image is made by `qemu-img create -f qcow2 -o preallocation=metadata`
(every cluster has a host cluster; the L2 tables are all present). "cold" is
the first call on a freshly opened image (it loads the L2 tables); "warm" is
the best and median of later calls, with the tables in the cache: that part
is the Python loop over the L2 entries. Not a test: it prints a table.

    .venv/bin/python bench/block_status.py [SIZE] [CLUSTER_SIZE] [RUNS]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imgchain.blockfile import BlockFile
from imgchain.qcow2 import Qcow2Driver


def main() -> None:
    size = sys.argv[1] if len(sys.argv) > 1 else "4G"
    cluster = sys.argv[2] if len(sys.argv) > 2 else "65536"
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "x.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                        f"preallocation=metadata,cluster_size={cluster}", path, size], check=True)
        driver = Qcow2Driver(BlockFile(path, writable=False), path)
        try:
            clusters = -(-driver.size // driver.cluster_size)
            t0 = time.perf_counter()
            extents = driver.block_status(0, driver.size)
            cold = time.perf_counter() - t0
            warm = []
            for _ in range(runs):
                t0 = time.perf_counter()
                driver.block_status(0, driver.size)
                warm.append(time.perf_counter() - t0)
        finally:
            driver.close()
    print(f"{'image':>14} {'clusters':>9} {'extents':>8} {'cold s':>8} {'warm best s':>12} "
          f"{'warm median s':>14} {'µs/cluster':>11}")
    print(f"{size + '/' + cluster:>14} {clusters:>9} {len(extents):>8} {cold:8.3f} {min(warm):12.4f} "
          f"{statistics.median(warm):14.4f} {min(warm) / clusters * 1e6:11.3f}")


if __name__ == "__main__":
    main()
