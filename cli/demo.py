"""The README's demo: build a small chain, work on it, and verify the result.

Run as `python -m imgchain.cli.demo WORKDIR`. It builds base.raw <- mid.qcow2
<- top.qcow2, writes through the Python API while keeping a model of the
expected guest content, shows `imgchain info --backing-chain`, `map` and
`check`, mounts the chain as a file and writes and reads it with `dd`
(checksums compared with the model), unmounts, runs a safe `rebase` that drops
mid.qcow2 from the chain, and checks with `imgchain compare`, `qemu-img
compare` and `qemu-img check` that nothing changed. Then it mounts the chain
again and streams base.raw into top.qcow2 (`imgchain stream`, a progress line
on a terminal) while a writer thread keeps writing and verifying through the
mount, shows the job in `imgchain jobs` and `imgchain mounts`, and checks the
final chain (top.qcow2 alone) against the writer's model and with `qemu-img
check`. Last, with the chain mounted again and the writer writing, it takes a
live snapshot (`imgchain snapshot top.qcow2 snap.qcow2`: the mount moves onto
snap.qcow2, top.qcow2 becomes its read-only backing), lets the writer write
into the overlay, and commits it back into top.qcow2 (`imgchain commit
snap.qcow2`: an active commit that pivots the mount onto top.qcow2), showing
`imgchain jobs` and `imgchain mounts` on the way; then the content is checked
against the model and every image with `qemu-img check`. Exits non-zero if
any verification fails.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import imgchain
from imgchain.create import create_image

SIZE = 64 << 20
MiB = 1 << 20
JOB_TIMEOUT = 600


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    print(f"\n$ {' '.join(argv)}", flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True)
    print((proc.stdout + proc.stderr).rstrip(), flush=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: '{' '.join(argv)}' exited {proc.returncode}")
    return proc


def digest(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def build_chain(work: str, model: bytearray) -> None:
    print("== building base.raw <- mid.qcow2 <- top.qcow2 (64 MiB)")
    base = os.path.join(work, "base.raw")
    create_image(base, "raw", SIZE)
    with open(base, "r+b") as f:
        for i in range(0, 16 * MiB, MiB):
            block = bytes([0x10 + i // MiB]) * (MiB // 2)
            f.seek(i)
            f.write(block)
            model[i:i + len(block)] = block
    create_image(os.path.join(work, "mid.qcow2"), backing_file="base.raw", backing_format="raw")
    create_image(os.path.join(work, "top.qcow2"), backing_file="mid.qcow2", cluster_size=65536)
    rng = random.Random(42)
    for name, count in (("mid.qcow2", 40), ("top.qcow2", 60)):
        with imgchain.open_chain(os.path.join(work, name), writable=True) as chain:
            for _ in range(count):
                off, n = rng.randrange(0, 24 * MiB), rng.randrange(1, 300_000)
                if rng.random() < 0.2:
                    chain.write_zeroes(off, n)
                    model[off:off + n] = bytes(n)
                else:
                    data = rng.randbytes(n)
                    chain.write(off, data)
                    model[off:off + n] = data
        print(f"   wrote {count} random requests (unaligned, some zero writes) into {name}")


def verify(work: str, model: bytearray, what: str) -> None:
    with imgchain.open_chain(os.path.join(work, "top.qcow2")) as chain:
        got = chain.read(0, chain.size)
    ok = got == model
    print(f"   {what}: chain sha256 {digest(got)}, model {digest(model)}: {'OK' if ok else 'MISMATCH'}")
    if not ok:
        raise SystemExit("demo: guest content differs from the model")


def mounted_io(work: str, model: bytearray) -> None:
    print("\n== mounting top.qcow2 as the regular file disk.img, then dd through it")
    run("imgchain", "mount", "top.qcow2", "disk.img")
    try:
        run("imgchain", "mounts")
        pattern = random.Random(7).randbytes(3 * MiB + 12345)
        with open("pattern.bin", "wb") as f:
            f.write(pattern)
        offset = 5 * MiB + 777  # unaligned, crossing clusters and layers
        run("dd", "if=pattern.bin", "of=disk.img", "bs=1M", f"seek={offset}", "oflag=seek_bytes",
            "conv=notrunc,fsync", "status=none")
        model[offset:offset + len(pattern)] = pattern
        run("dd", "if=disk.img", "of=readback.bin", "bs=1M", "iflag=direct", "status=none")
        with open("readback.bin", "rb") as f:
            got = f.read()
        ok = got == model
        print(f"   dd readback sha256 {digest(got)}, model {digest(model)}: {'OK' if ok else 'MISMATCH'}")
        if not ok:
            raise SystemExit("demo: the mounted file differs from the model")
    finally:
        run("imgchain", "unmount", "disk.img")
    run("imgchain", "check", "top.qcow2")
    verify(work, model, "content after the mount")
    with open("model.raw", "wb") as f:
        f.write(model)


class Writer(threading.Thread):
    """Writes random 4 KiB blocks through the mounted file with O_DIRECT (past
    the page cache, so every request reaches the daemon), reads each one back,
    and keeps the model of the guest content up to date."""

    BLOCK = 4096

    def __init__(self, disk: str, model: bytearray, span: int) -> None:
        super().__init__(daemon=True)
        self.disk, self.model, self.span = disk, model, span
        self.stop = threading.Event()
        self.writes = 0
        self.error: str | None = None
        self.pause = 0.0  # seconds between two writes (0: as fast as it can)

    def run(self) -> None:
        rng = random.Random(99)
        fd = os.open(self.disk, os.O_RDWR | os.O_DIRECT)
        out, back = mmap.mmap(-1, self.BLOCK), mmap.mmap(-1, self.BLOCK)
        try:
            while not self.stop.is_set():
                off = rng.randrange(0, self.span // self.BLOCK) * self.BLOCK
                data = rng.randbytes(self.BLOCK)
                out[:] = data
                os.pwritev(fd, [out], off)
                self.model[off:off + self.BLOCK] = data
                os.preadv(fd, [back], off)
                if back[:] != data:
                    self.error = f"read back at {off} differs from what was written"
                    return
                self.writes += 1
                if self.pause:
                    time.sleep(self.pause)
        except OSError as exc:
            self.error = str(exc)
        finally:
            os.close(fd)

    def wait_writes(self, more: int) -> None:
        """Until the writer has done `more` verified writes beyond now (or failed)."""
        target = self.writes + more
        while self.writes < target and self.is_alive():
            time.sleep(0.01)
        if self.error is not None:
            raise SystemExit(f"demo: the writer failed: {self.error}")

    def finish(self, during: str = "the stream") -> None:
        self.stop.set()
        self.join()
        print(f"   writer: {self.writes} verified 4 KiB writes through the mount during {during}"
              f"{'' if self.error is None else ': ' + self.error}")
        if self.error is not None or not self.writes:
            raise SystemExit(f"demo: the writer failed during {during}")


def read_direct(path: str, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, size)
        os.preadv(fd, [buf], 0)
        return bytes(buf)
    finally:
        os.close(fd)


def run_job(*argv: str) -> None:
    """Run a job command (its progress line goes to the terminal) and show
    `imgchain jobs` and `imgchain mounts` while the job runs."""
    print(f"\n$ {' '.join(argv)}    (progress on a terminal; the writer keeps going)", flush=True)
    job = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)  # stderr: the progress line
    while job.poll() is None:
        jobs = subprocess.run(["imgchain", "jobs", "--output", "json"], capture_output=True, text=True)
        if jobs.returncode == 0 and json.loads(jobs.stdout):
            break
        time.sleep(0.05)
    if job.poll() is None:
        run("imgchain", "jobs")
        run("imgchain", "mounts")
    try:
        out, _ = job.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        job.send_signal(signal.SIGINT)  # cancels the job in the daemon
        job.communicate()
        raise SystemExit(f"demo: '{' '.join(argv)}' did not end within {JOB_TIMEOUT} s") from None
    print(out.rstrip(), flush=True)
    if job.returncode != 0:
        raise SystemExit(f"demo: '{' '.join(argv)}' exited {job.returncode}")


def stream_while_writing(work: str, model: bytearray) -> None:
    print("\n== live stream: mount top.qcow2 again, pull base.raw into it while a writer writes and verifies")
    run("imgchain", "mount", "top.qcow2", "disk.img")
    try:
        writer = Writer("disk.img", model, 24 * MiB)
        writer.start()
        run_job("imgchain", "stream", "--speed", "8M", "--output", "json", "top.qcow2")
        writer.finish()
        got = read_direct("disk.img", SIZE)
        ok = got == model
        print(f"   mounted file sha256 {digest(got)}, model {digest(model)}: {'OK' if ok else 'MISMATCH'}")
        if not ok:
            raise SystemExit("demo: the mounted file differs from the model after the stream")
    finally:
        run("imgchain", "unmount", "disk.img")
    run("imgchain", "info", "--backing-chain", "top.qcow2")
    verify(work, model, "content after the live stream")
    with open("model.raw", "wb") as f:
        f.write(model)
    run("qemu-img", "compare", "top.qcow2", "model.raw")
    for image in ("top.qcow2", "mid.qcow2"):
        run("imgchain", "check", image)
        run("qemu-img", "check", image)


def mounted_image(disk: str) -> str:
    proc = subprocess.run(["imgchain", "mounts", "--output", "json"], capture_output=True, text=True, check=True)
    for doc in json.loads(proc.stdout):
        if doc["mountpoint"] == os.path.abspath(disk):
            return os.path.basename(doc["image"])
    raise SystemExit(f"demo: {disk} is not in `imgchain mounts`")


def expect_mounted(disk: str, image: str) -> None:
    now = mounted_image(disk)
    print(f"   {disk} is mounted on {now}: {'OK' if now == image else 'expected ' + image}")
    if now != image:
        raise SystemExit(f"demo: the mount is on {now}, not on {image}")


def snapshot_and_commit_while_writing(work: str, model: bytearray) -> None:
    print("\n== live snapshot and active commit: mount top.qcow2, snapshot it while a writer writes,"
          "\n   then commit the snapshot back into top.qcow2 and pivot the mount onto it")
    run("imgchain", "mount", "top.qcow2", "disk.img")
    try:
        writer = Writer("disk.img", model, 24 * MiB)
        writer.start()
        writer.wait_writes(100)
        run("imgchain", "snapshot", "top.qcow2", "snap.qcow2")
        expect_mounted("disk.img", "snap.qcow2")
        run("imgchain", "mounts")
        run("qemu-img", "info", "-U", "snap.qcow2")
        writer.wait_writes(2000)  # these land in snap.qcow2
        # A rate-limited active commit must copy faster than the guest dirties
        # the image to become ready (QEMU's mirror too): the writer slows down
        # to about 100 writes a second (at most 6.4 MiB of 64 KiB clusters).
        print("   (the writer goes on at about 100 writes a second during the rate-limited commit)")
        writer.pause = 0.01
        run_job("imgchain", "commit", "--speed", "16M", "--output", "json", "snap.qcow2")
        writer.pause = 0.0
        expect_mounted("disk.img", "top.qcow2")
        run("imgchain", "mounts")
        writer.wait_writes(100)  # and these in top.qcow2 again
        writer.finish("the snapshot and the commit")
        got = read_direct("disk.img", SIZE)
        ok = got == model
        print(f"   mounted file sha256 {digest(got)}, model {digest(model)}: {'OK' if ok else 'MISMATCH'}")
        if not ok:
            raise SystemExit("demo: the mounted file differs from the model after the commit")
    finally:
        run("imgchain", "unmount", "disk.img")
    run("imgchain", "info", "--backing-chain", "top.qcow2")
    verify(work, model, "content after the snapshot and the active commit")
    with open("model.raw", "wb") as f:
        f.write(model)
    run("qemu-img", "compare", "top.qcow2", "model.raw")
    for image in ("top.qcow2", "mid.qcow2", "snap.qcow2"):
        run("imgchain", "check", image)
        run("qemu-img", "check", image)


def main() -> None:
    work = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "demo-work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    os.chdir(work)
    model = bytearray(SIZE)
    build_chain(work, model)
    verify(work, model, "content after writes")
    with open("model.raw", "wb") as f:
        f.write(model)
    run("imgchain", "info", "--backing-chain", "top.qcow2")
    run("imgchain", "map", "top.qcow2")
    for image in ("top.qcow2", "mid.qcow2"):
        run("imgchain", "check", image)
        run("qemu-img", "check", image)
    mounted_io(work, model)
    print("\n== safe rebase: top.qcow2 onto base.raw, dropping mid.qcow2")
    run("imgchain", "rebase", "-b", "base.raw", "-F", "raw", "top.qcow2")
    run("imgchain", "info", "--backing-chain", "top.qcow2")
    verify(work, model, "content after rebase")
    run("imgchain", "compare", "top.qcow2", "model.raw")
    run("qemu-img", "compare", "top.qcow2", "model.raw")
    run("qemu-img", "check", "top.qcow2")
    stream_while_writing(work, model)
    snapshot_and_commit_while_writing(work, model)
    print("\ndemo: all verifications passed")


if __name__ == "__main__":
    main()
