"""Build a larger backing chain with imgchain itself (for tests, demos and benchmarks).

    .venv/bin/python testimages/build_chain.py DIR [--layers 3] [--size 1G]
        [--cluster-size 64K] [--fraction 0.25] [--raw-base] [--seed 1]

Creates DIR/layer0.(raw|qcow2) <- DIR/layer1.qcow2 <- ... ; the base is fully
written with random data, and each overlay gets `fraction` of its clusters
rewritten at random (whole clusters, plus a few unaligned writes and zero
writes). Prints the active image and the sha256 of its guest content, which
`qemu-img convert -O raw` of the chain reproduces.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random

import imgchain
from imgchain.create import create_image

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def size_arg(text: str) -> int:
    unit = text[-1].upper()
    return int(float(text[:-1]) * UNITS[unit]) if unit in UNITS else int(text)


def fill_base(path: str, size: int, rng: random.Random) -> None:
    step = 1 << 20
    with imgchain.open_chain(path, writable=True) as chain:
        for off in range(0, size, step):
            chain.write(off, rng.randbytes(min(step, size - off)))


def rewrite(path: str, size: int, cluster: int, fraction: float, rng: random.Random) -> None:
    clusters = size // cluster
    with imgchain.open_chain(path, writable=True) as chain:
        for index in rng.sample(range(clusters), int(clusters * fraction)):
            chain.write(index * cluster, rng.randbytes(cluster))
        for _ in range(8):  # some unaligned writes and zero writes too
            off = rng.randrange(0, size - 200_000)
            chain.write(off, rng.randbytes(rng.randrange(1, 200_000)))
            chain.write_zeroes(rng.randrange(0, size - 300_000), rng.randrange(1, 300_000))


def build(directory: str, layers: int, size: int, cluster: int, fraction: float,
          raw_base: bool, seed: int) -> str:
    """Build the chain; returns the active image's path."""
    rng = random.Random(seed)
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, "layer0." + ("raw" if raw_base else "qcow2"))
    create_image(base, "raw" if raw_base else "qcow2", size,
                 cluster_size=cluster)
    fill_base(base, size, rng)
    below = base
    for i in range(1, layers):
        path = os.path.join(directory, f"layer{i}.qcow2")
        create_image(path, "qcow2", size, os.path.basename(below), None, cluster)
        rewrite(path, size, cluster, fraction, rng)
        below = path
    return below


def content_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with imgchain.open_chain(path) as chain:
        for off in range(0, chain.size, 1 << 20):
            digest.update(chain.read(off, min(1 << 20, chain.size - off)))
    return digest.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--size", type=size_arg, default=1 << 30)
    p.add_argument("--cluster-size", type=size_arg, default=65536)
    p.add_argument("--fraction", type=float, default=0.25)
    p.add_argument("--raw-base", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    top = build(a.directory, a.layers, a.size, a.cluster_size, a.fraction, a.raw_base, a.seed)
    print(top, content_sha256(top))


if __name__ == "__main__":
    main()
