"""Property: random chains and random write sequences agree with a bytearray model.

Chains of 1-4 layers (raw or qcow2 base, cluster sizes 512 B to 2 MiB, layers
of different virtual sizes) are built one layer at a time; each new active
layer gets a random sequence of unaligned writes and zero writes, mirrored on
a plain bytearray. After each sequence: imgchain reads back the model,
`qemu-img check` is clean on every qcow2 image, and `qemu-img compare` of the
chain against a raw file of the model says identical.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import imgchain
from imgchain.create import create_image

from .conftest import assert_qemu_clean, qemu_img

EXAMPLES = int(os.environ.get("IMGCHAIN_PROPERTY_EXAMPLES", "30"))
CLUSTER_BITS = [9, 10, 12, 16, 21]


@st.composite
def layer_specs(draw: st.DrawFn) -> list[dict]:
    count = draw(st.integers(1, 4))
    layers = []
    for i in range(count):
        fmt = "raw" if i == 0 and draw(st.booleans()) else "qcow2"
        size = draw(st.integers(1, 96)) * 64 * 1024  # 64 KiB .. 6 MiB
        ops = draw(st.lists(st.tuples(st.sampled_from(["write", "write", "zero"]),
                                      st.floats(0, 1), st.integers(1, 300_000),
                                      st.integers(0, 2**32)), max_size=12))
        layers.append(dict(fmt=fmt, bits=draw(st.sampled_from(CLUSTER_BITS)), size=size, ops=ops))
    return layers


def _apply_ops(path: Path, layer: dict, model: bytearray) -> None:
    with imgchain.open_chain(path, writable=True) as chain:
        assert chain.size == len(model)
        for kind, where, n, seed in layer["ops"]:
            off = int(where * (len(model) - 1))
            n = min(n, len(model) - off)
            if kind == "zero":
                chain.write_zeroes(off, n)
                model[off:off + n] = bytes(n)
            else:
                data = random.Random(seed).randbytes(n)
                chain.write(off, data)
                model[off:off + n] = data


def _verify(tmp: Path, path: Path, model: bytearray, images: list[Path]) -> None:
    with imgchain.open_chain(path) as chain:
        assert chain.read(0, chain.size) == model
    assert_qemu_clean(*images)
    reference = tmp / "model.raw"
    reference.write_bytes(model)
    fmt = "raw" if path.suffix == ".raw" else "qcow2"
    proc = qemu_img("compare", "-f", fmt, "-F", "raw", path, reference)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(layers=layer_specs())
def test_random_chains_match_model(tmp_path_factory, layers: list[dict]) -> None:
    tmp = tmp_path_factory.mktemp("chain")
    model = bytearray()
    images: list[Path] = []
    for i, layer in enumerate(layers):
        path = tmp / f"layer{i}.{'raw' if layer['fmt'] == 'raw' else 'qcow2'}"
        backing = images[-1].name if images else None
        size = layer["size"]
        if layer["fmt"] == "raw":
            create_image(str(path), "raw", size)
        else:
            create_image(str(path), "qcow2", size, backing, None, 1 << layer["bits"])
        model = (model + bytes(size))[:size]
        images.append(path)
        _apply_ops(path, layer, model)
        _verify(tmp, path, model, images)
