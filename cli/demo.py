"""The README's demo: build a small chain, work on it, and verify the result.

Run as `python -m imgchain.cli.demo WORKDIR`. It builds base.raw <- mid.qcow2
<- top.qcow2, writes through the Python API while keeping a model of the
expected guest content, shows `imgchain info --backing-chain`, `map` and
`check`, mounts the chain as a file and writes and reads it with `dd`
(checksums compared with the model), unmounts, runs a safe `rebase` that drops
mid.qcow2 from the chain, and checks with `imgchain compare`, `qemu-img
compare` and `qemu-img check` that nothing changed. Exits non-zero if any
verification fails.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys

import imgchain
from imgchain.create import create_image

SIZE = 64 << 20
MiB = 1 << 20


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
    print("\ndemo: all verifications passed")


if __name__ == "__main__":
    main()
