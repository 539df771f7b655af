"""The fast write path: copy-on-write of only what a write leaves, the
backend's in-place map, and writes of more pieces than one pwritev takes.
Each result is checked with qemu-img/qemu-io."""

from __future__ import annotations

import os
from pathlib import Path

from imgchain.backend import BlockBackend
from imgchain.chain import close_chain, open_backing_chain, open_chain
from imgchain.create import create_image

from .conftest import assert_qemu_clean, qemu_img, qemu_io

KIB, MIB = 1024, 1024 * 1024


def test_partial_writes_copy_head_and_tail_from_each_kind_of_cluster(chain3: Path) -> None:
    """4 KiB clusters in top: unallocated (backing shows through), zero, allocated."""
    with open_chain(chain3, writable=True) as chain:
        model = bytearray(chain.read(0, chain.size))
        chain.write_zeroes(8 * KIB, 4 * KIB)  # cluster 2 becomes a zero cluster
        model[8 * KIB:12 * KIB] = bytes(4 * KIB)
        for off, n, byte in ((1000, 100, 0x51),          # unallocated: head and tail from below
                             (8 * KIB + 4000, 96, 0x52),  # zero cluster: zeros around
                             (1500, 10, 0x53),            # now allocated: in place
                             (12 * KIB - 1, 2, 0x54),     # tail of one cluster, head of the next
                             (16 * KIB, 4 * KIB, 0x55)):  # a whole cluster: nothing to copy
            chain.write(off, bytes([byte]) * n)
            model[off:off + n] = bytes([byte]) * n
        assert chain.read(0, chain.size) == model
    with open_chain(chain3) as chain:
        assert chain.read(0, chain.size) == model
    assert_qemu_clean(chain3)


async def test_in_place_map_forgets_a_cluster_that_was_zeroed(chain3: Path) -> None:
    top = open_backing_chain(str(chain3), writable=True)
    try:
        backend = BlockBackend(top)
        await backend.write(4 * KIB + 10, b"\x61" * 10)   # copy-on-write: cluster 1 allocated
        await backend.write(4 * KIB + 30, b"\x62" * 10)   # in place, through the map
        await backend.write_zeroes(4 * KIB, 4 * KIB)       # the host cluster is freed
        await backend.write(4 * KIB + 50, b"\x63" * 10)   # must allocate again, not reuse the map
        expect = bytearray(4 * KIB)
        expect[50:60] = b"\x63" * 10
        assert await backend.read(4 * KIB, 4 * KIB) == expect
        backend.invalidate_map()
        await backend.write(4 * KIB + 70, b"\x64" * 10)
        expect[70:80] = b"\x64" * 10
        assert await backend.read(4 * KIB, 4 * KIB) == expect
    finally:
        close_chain(top)
    assert_qemu_clean(chain3)
    io = qemu_io(chain3, "read -P 0 4k 50", "read -P 0x63 4146 10", "read -P 0 4156 10",
                 "read -P 0x64 4166 10", "read -P 0 4176 4016")
    assert "Pattern verification failed" not in io.stdout, io.stdout


def test_one_write_of_more_clusters_than_one_pwritev_takes(tmp_path: Path) -> None:
    image = tmp_path / "c512.qcow2"
    create_image(str(image), size=8 * MIB, cluster_size=512)
    data = os.urandom(3 * MIB + 300)  # 6000+ clusters, partial at both ends
    with open_chain(image, writable=True) as chain:
        chain.write(1000, data)
    with open_chain(image) as chain:
        assert chain.read(1000, len(data)) == data
        assert chain.read(0, 1000) == bytes(1000)
    assert_qemu_clean(image)
    raw = tmp_path / "c.raw"
    qemu_img("convert", "-O", "raw", image, raw, check=True)
    with open(raw, "rb") as f:
        f.seek(1000)
        assert f.read(len(data)) == data
