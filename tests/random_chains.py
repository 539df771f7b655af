"""Random chains made by qemu-img and qemu-io, for the tests that hold
imgchain's output to qemu-img's (map, compare): a raw or qcow2 base, mixed
cluster sizes, backings sometimes shorter than their overlay, and random
writes, zero writes and discards in every layer."""

from __future__ import annotations

import os
import random

from .conftest import qemu_img, qemu_io

MiB = 1 << 20


def io(image: str, *commands: str, fmt: str = "qcow2") -> None:
    """qemu-io commands on one image; any error fails the test."""
    proc = qemu_io(image, *commands, fmt=fmt)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


def create(name: str, size: int | str | None, *options: str) -> None:
    """qemu-img create (the format from the name); no size: the backing's."""
    fmt = "raw" if name.endswith(".raw") else "qcow2"
    qemu_img("create", "-q", "-f", fmt, *options, name, *([] if size is None else [str(size)]), check=True)


def virtual_size(name: str) -> int:
    return int(qemu_img("info", "--output=json", name).stdout.split('"virtual-size": ')[1].split(",")[0])


def build_random_chain(rng: random.Random) -> list[str]:
    """A chain of 1 to 4 images in the current directory; their names, base first."""
    size = rng.choice([4, 8]) * MiB
    raw_base = rng.random() < 0.5
    names = ["l0.raw" if raw_base else "l0.qcow2"]
    create(names[0], size if rng.random() < 0.7 else size // 2,
           *([] if raw_base else ["-o", f"cluster_size={rng.choice([4096, 65536])}"]))
    for i in range(1, rng.randint(1, 4)):
        layer_size = size if rng.random() < 0.8 else size - rng.choice([1, 2]) * MiB // 2
        create(f"l{i}.qcow2", layer_size, "-o", f"cluster_size={rng.choice([4096, 65536, 512 * 1024])}",
               "-b", names[-1], "-F", "raw" if i == 1 and raw_base else "qcow2")
        names.append(f"l{i}.qcow2")
    for name in names:
        fmt = "raw" if name.endswith(".raw") else "qcow2"
        limit = os.path.getsize(name) if fmt == "raw" else virtual_size(name)
        commands = []
        for _ in range(rng.randint(0, 8)):
            offset = rng.randrange(limit // 4096) * 4096
            length = min(rng.choice([4096, 65536, 299520, MiB]), limit - offset)
            kind = rng.random()
            if kind < 0.5:
                commands.append(f"write -P {rng.randrange(256)} {offset} {length}")
            elif kind < 0.8:
                commands.append(f"write -z {offset} {length}")
            elif fmt == "qcow2":
                commands.append(f"discard {offset} {length}")
        if commands:
            io(name, *commands, fmt=fmt)
    return names
