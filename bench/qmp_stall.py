"""How long hostile QMP input holds up guest reads on a mount (issue 7).

Mounts a small chain with `imgchain mount`, runs a thread that reads 4 KiB
with O_DIRECT from the mounted file in a loop, and sends each hostile input
in turn on the QMP socket, waiting for its reply. Prints, per input, the
longest and the 99th-percentile read latency seen while the daemon dealt with
it (idle: no QMP traffic). Not a test: tests never assert on timings.

    .venv/bin/python bench/qmp_stall.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

IMGCHAIN = str(Path(sys.executable).with_name("imgchain"))
VALID = b'{"execute": "query-version", "id": "ok"}\n'
INPUTS = {
    "idle": b"",
    "16 MiB string": b'{"execute": "x", "arguments": {"s": "' + b"y" * (16 << 20) + b'"}}\n',
    "100000 [": b"[" * 100_000 + b"\n",
    "1 MiB of \"\"": b'""' * (1 << 19) + b"\n",
    "1 MiB of 0,": b"[" + b"0," * (1 << 19) + b"0]\n",
    "5000-digit id": b'{"execute": "query-version", "id": ' + b"7" * 5000 + b"}\n",
}


def reader(path: Path, stop: threading.Event, latencies: list[float]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    try:
        while not stop.is_set():
            t = time.perf_counter()
            os.preadv(fd, [buf], 0)
            latencies.append(time.perf_counter() - t)
    finally:
        os.close(fd)


def send_and_wait(sock_path: str, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock_path)
        f = s.makefile("rb")
        f.readline()
        s.sendall(data + VALID)
        while json.loads(f.readline()).get("id") != "ok":
            pass


def measure(disk: Path, sock_path: str, data: bytes) -> tuple[float, float]:
    stop, latencies = threading.Event(), []
    thread = threading.Thread(target=reader, args=(disk, stop, latencies))
    thread.start()
    try:
        time.sleep(0.1)
        start = len(latencies)
        if data:
            send_and_wait(sock_path, data)
        else:
            time.sleep(0.5)
        window = latencies[start:]
    finally:
        stop.set()
        thread.join()
    return max(window), statistics.quantiles(window, n=100)[98]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = dict(os.environ, IMGCHAIN_RUNTIME_DIR=str(work / "run"))
        os.mkdir(work / "run", 0o700)
        subprocess.run([IMGCHAIN, "create", "-f", "qcow2", str(work / "top.qcow2"), "64M"], check=True, env=env)
        disk = work / "disk.img"
        subprocess.run([IMGCHAIN, "mount", str(work / "top.qcow2"), str(disk)], check=True, env=env)
        try:
            record = json.loads(subprocess.run([IMGCHAIN, "mounts", "--output", "json"], env=env,
                                               capture_output=True, text=True, check=True).stdout)[0]
            print("| input | longest read (ms) | p99 read (ms) |\n|---|---|---|")
            for name, data in INPUTS.items():
                runs = [measure(disk, record["socket"], data) for _ in range(args.repeat)]
                worst = max(r[0] for r in runs) * 1000
                p99 = statistics.median(r[1] for r in runs) * 1000
                print(f"| {name} | {worst:.1f} | {p99:.2f} |")
        finally:
            subprocess.run([IMGCHAIN, "unmount", str(disk)], env=env)


if __name__ == "__main__":
    main()
