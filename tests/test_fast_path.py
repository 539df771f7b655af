"""The fast paths: the backend's cluster maps (reads and in-place writes done
at once, filled a group of clusters at a time, forgotten when a cluster
moves), the export's reused buffer for large reads, copy-on-write of only
what a write leaves, and writes of more pieces than one pwritev takes. Results are checked against the slow path and with
qemu-img/qemu-io."""

from __future__ import annotations

import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import trio
import trio.testing

from imgchain.backend import UNMAPPABLE, BlockBackend
from imgchain.blkdebug import BlkDebug, Rule
from imgchain.chain import close_chain, open_backing_chain, open_chain
from imgchain.create import create_image
from imgchain.errors import ImageIOError
from imgchain.formats import FormatError
from imgchain.fuse.export import BlockExport

from .conftest import assert_qemu_clean, qemu_img, qemu_io

KIB, MIB = 1024, 1024 * 1024


@contextmanager
def backend_on(image: Path) -> Iterator[BlockBackend]:
    """A BlockBackend on the writable chain of `image`, closed afterwards."""
    top = open_backing_chain(str(image), writable=True)
    try:
        yield BlockBackend(top)
    finally:
        close_chain(top)


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
    with backend_on(chain3) as backend:
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


@pytest.fixture
def mixed_chain(tmp_path: Path) -> Path:
    """base.raw <- mid.qcow2 (64 KiB clusters, written by qemu-io) <- top.qcow2
    (4 KiB clusters): guest clusters of top split across layers, zero and
    compressed clusters, and a virtual size that ends inside a cluster."""
    size = 3 * MIB + 5 * 512
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
    mid, top = tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", mid, str(size), check=True)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", mid, "-F", "qcow2",
             top, str(size), check=True)
    io = qemu_io(mid, "write -P 0x71 100k 200k", "write -z 1M 128k", "write -c -P 0x72 2M 64k",
                 "write -P 0x73 3M 2560", fmt="qcow2")
    assert io.returncode == 0, io.stderr
    io = qemu_io(top, "write -P 0x74 150k 9k", "write -z 400k 8k", "write -P 0x75 3M 2k", fmt="qcow2")
    assert io.returncode == 0, io.stderr
    return top


async def test_reads_through_the_map_equal_the_slow_path(mixed_chain: Path) -> None:
    with backend_on(mixed_chain) as backend:
        top, rng = backend.root, random.Random(7)
        offsets = [rng.randrange(backend.size) for _ in range(400)]
        offsets += [backend.size - n for n in (1, 512, 2560, 4096)]
        fast = single = 0
        for off in offsets:
            n = min(rng.choice((1, 512, 4096, 5000)), backend.size - off)
            expect = top.read(off, n)
            assert await backend.read(off, n) == expect  # fills the map on the way
            single += off // 4096 == (off + n - 1) // 4096
            now = backend.read_now(off, n)
            if now is not None:
                fast += 1
                assert now == expect, (off, n)
        assert fast > 0.8 * single  # zero and compressed clusters are never mapped
        assert backend.read_now(backend.size - 10, 20) is None  # past the end: the slow path clamps


async def test_copies_on_write_whose_old_bytes_are_cached_are_done_at_once(mixed_chain: Path) -> None:
    """A small write into a cluster top does not hold, whose old bytes the map knows, is
    allocated, written and entered without the coroutine path; the result is what qemu-io
    makes of the same writes. Zero clusters of top, compressed sources and a cluster with
    an allocation in flight go the slow way."""
    twin = mixed_chain.with_name("twin.qcow2")
    twin.write_bytes(mixed_chain.read_bytes())
    rng, writes, at_once = random.Random(3), [], 0
    with backend_on(mixed_chain) as backend:
        driver = backend.root.driver
        model = bytearray(backend.root.read(0, backend.size))
        for group in range(0, backend.size, 256 * KIB):
            await backend.read(group, 1)  # maps every cluster
        busy = 900 * KIB  # unallocated in top, data below: an allocation in flight there
        meta = driver.begin_allocation(busy + 10, b"x", (backend._root_fd, 0))
        assert not backend.write_now(busy + 100, b"y")
        driver.abort_allocation(meta)
        for _ in range(300):
            off = rng.randrange(backend.size - 1)
            n = rng.randrange(1, min(4096 - off % 4096, backend.size - off) + 1)
            data = bytes([rng.randrange(1, 256)]) * n
            entry, fresh = driver.l2_entry(off), backend._lookup(off >> 12)
            done = backend.write_now(off, data)
            if not done:
                await backend.write(off, data)
            if entry == 0 and fresh > 0 and n < 4096:  # unallocated in top, old bytes in one file
                assert done, (off, n)
                at_once += 1
            zero_in_top = entry & 1 and not entry & ~0x1FF  # a zero cluster with no host cluster
            if zero_in_top or (entry == 0 and fresh == UNMAPPABLE):  # or compressed below
                assert not done, (off, n)
            model[off:off + n] = data
            writes.append(f"write -P {data[0]} {off} {n}")
        assert at_once > 100
        assert await backend.read(0, backend.size) == model
    assert_qemu_clean(mixed_chain)
    assert qemu_io(twin, *writes, fmt="qcow2").returncode == 0
    assert qemu_img("compare", twin, mixed_chain).returncode == 0


async def test_a_miss_maps_the_clusters_around_it(chain3: Path) -> None:
    with backend_on(chain3) as backend:
        assert backend.read_now(40 * KIB, 4 * KIB) is None  # nothing resolved yet
        await backend.read(0, 4 * KIB)
        assert backend.read_now(40 * KIB, 4 * KIB) == backend.root.read(40 * KIB, 4 * KIB)


async def test_fast_paths_step_aside_while_drained_or_with_fault_rules(chain3: Path) -> None:
    with backend_on(chain3) as backend:
        await backend.read(0, 4 * KIB)
        await backend.write(8 * KIB, b"\x81" * 100)  # allocated in top: in place from now on
        assert backend.read_now(0, 4 * KIB) is not None
        assert backend.write_now(8 * KIB, b"\x82" * 100)
        async with backend.drained():
            assert backend.read_now(0, 4 * KIB) is None
            assert not backend.write_now(8 * KIB, b"\x83" * 100)
        assert backend.read_now(0, 4 * KIB) is None  # the end of a drain forgets the map
        await backend.read(0, 4 * KIB)
        backend.debug = BlkDebug([Rule(image="top", op="read", delay_ms=1)])
        assert backend.read_now(0, 4 * KIB) is None
        assert not backend.write_now(8 * KIB, b"\x84" * 100)
        assert backend.root.read(8 * KIB, 100) == b"\x82" * 100


async def test_large_reads_reuse_one_buffer_and_never_show_its_old_content(chain3: Path) -> None:
    """What the export returns is copied at once, as pyfuse3 does with a reply."""
    with backend_on(chain3) as backend:
        export = BlockExport(backend, read_only=False)
        await backend.write_zeroes(64 * KIB, 128 * KIB)    # zero clusters over the 0xaa base
        await backend.write(512 * KIB, b"\x91" * 1000)
        size = backend.size
        for off, n in ((0, 300 * KIB), (2 * MIB, 256 * KIB), (500 * KIB, 256 * KIB), (0, 256 * KIB),
                       (size - 100 * KIB, 200 * KIB), (2 * MIB + 4 * KIB, 70 * KIB)):
            got = bytes(await export.read(1, off, n))
            assert got == backend.root.read(off, min(n, size - off)), (off, n)
        first = await export.read(1, 0, 256 * KIB)
        second = await export.read(1, 2 * MIB, 256 * KIB)
        assert isinstance(first, memoryview) and first.obj is second.obj  # one buffer, reused


async def test_a_large_read_waiting_in_a_drain_does_not_share_the_buffer(chain3: Path) -> None:
    with backend_on(chain3) as backend:
        export = BlockExport(backend, read_only=False)
        results: dict[int, bytes] = {}

        async def read(off: int) -> None:
            results[off] = bytes(await export.read(1, off, 128 * KIB))

        async with trio.open_nursery() as nursery:
            async with backend.drained():
                for off in (0, 1 * MIB, 960 * KIB):
                    nursery.start_soon(read, off)
                await trio.testing.wait_all_tasks_blocked()
                assert not results
        for off, data in results.items():
            assert data == backend.root.read(off, 128 * KIB)
        assert len(results) == 3


async def test_a_corrupt_neighbour_does_not_fail_a_read_of_a_sound_cluster(tmp_path: Path) -> None:
    image = tmp_path / "c.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "8M", check=True)
    assert qemu_io(image, "write -P 0x11 0 64k", "write -P 0x22 320k 64k", fmt="qcow2").returncode == 0
    with open(image, "r+b") as f:  # L2 entry 5: host offset moved off its cluster boundary
        f.seek(40)
        l1 = int.from_bytes(f.read(8), "big")
        f.seek(l1)
        l2 = int.from_bytes(f.read(8), "big") & 0x00FFFFFFFFFFFE00
        f.seek(l2 + 5 * 8)
        entry = int.from_bytes(f.read(8), "big")
        f.seek(l2 + 5 * 8)
        f.write((entry + 512).to_bytes(8, "big"))
    top = open_backing_chain(str(image), writable=False)
    try:
        backend = BlockBackend(top)
        assert await backend.read(0, 4 * KIB) == b"\x11" * 4 * KIB
        assert backend.read_now(4 * KIB, 4 * KIB) == b"\x11" * 4 * KIB
        with pytest.raises(FormatError, match="unaligned"):
            await backend.read(5 * 64 * KIB, 4 * KIB)
    finally:
        close_chain(top)


async def test_negative_offsets_are_refused(chain3: Path) -> None:
    with backend_on(chain3) as backend:
        await backend.read(backend.size - 4 * KIB, 4 * KIB)  # map the last clusters
        for call in (backend.read(-4 * KIB, 10), backend.read_into(-4 * KIB, memoryview(bytearray(10)))):
            with pytest.raises(ImageIOError, match="negative offset"):
                await call
        assert backend.read_now(-4 * KIB, 10) is None


async def test_clusters_that_cannot_be_mapped_are_resolved_once(chain3: Path) -> None:
    with backend_on(chain3) as backend:
        await backend.write_zeroes(64 * KIB, 64 * KIB)  # zero clusters: mapped as zeros
        walks = []
        resolve = backend.resolve

        def counting(offset: int, length: int):
            walks.append(offset)
            return resolve(offset, length)

        backend.resolve = counting  # type: ignore[method-assign]
        for _ in range(3):
            assert await backend.read(80 * KIB, 4 * KIB) == bytes(4 * KIB)
        assert len(walks) == 1
        await backend.write(80 * KIB, b"\x99" * 10)  # the cluster moves; the write notes where to
        assert (await backend.read(80 * KIB, 4 * KIB))[:10] == b"\x99" * 10
        assert len(walks) == 1
        await backend.write(84 * KIB - 5, b"\x98" * 10)  # two clusters: forgotten, resolved again
        assert (await backend.read(84 * KIB, 4 * KIB))[:5] == b"\x98" * 5
        assert len(walks) == 2


async def test_writes_in_place_go_off_the_loop_while_a_sync_runs(chain3: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """While an fdatasync of the chain runs in a worker thread (a job's, or the
    device's flush), the file system can make a write wait for its journal:
    writes in place then go to a worker thread too, so one held write does
    not hold the requests behind it. A zeroing waits for them (it may free
    their clusters); with no sync running, writes in place are done at once."""
    release, held = trio.Event(), trio.Event()
    real = trio.to_thread.run_sync

    async def gated(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        if getattr(fn, "__name__", "") in ("pwrite", "copy"):
            held.set()
            await release.wait()
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", gated)
    with backend_on(chain3) as backend:
        await backend.write(8 * KIB, b"\x81" * 100)  # allocated in top: in place from now on
        await backend.read(0, 4 * KIB)
        backend.syncs_running += 1  # as BlockGraph.sync_off_loop and flush do around their fdatasync
        assert not backend.write_now(8 * KIB, b"\x82" * 100)
        done: list[str] = []
        async with trio.open_nursery() as nursery:
            async def write_in_place() -> None:
                await backend.write(8 * KIB, b"\x83" * 100)
                done.append("write")

            async def zero() -> None:
                await backend.write_zeroes(8 * KIB, 4 * KIB)
                done.append("zeroes")

            nursery.start_soon(write_in_place)
            with trio.fail_after(10):
                await held.wait()
            assert bytes(await backend.read(0, 4 * KIB)) == b"\xaa" * 4096  # served meanwhile
            nursery.start_soon(zero)
            await trio.testing.wait_all_tasks_blocked()
            assert done == [] and backend.in_flight == 2  # both wait: the write in its thread, the zeroing for it
            release.set()
        assert done == ["write", "zeroes"]
        assert backend.root.read(8 * KIB, 4 * KIB) == bytes(4 * KIB)
        release, held = trio.Event(), trio.Event()
        async with trio.open_nursery() as nursery:  # a copy-on-write meanwhile: off the loop too
            async def copy_on_write() -> None:
                await backend.write(20 * KIB + 10, b"\x86" * 100)  # unallocated in top: from below
                done.append("cow")

            nursery.start_soon(copy_on_write)
            with trio.fail_after(10):
                await held.wait()
            assert bytes(await backend.read(0, 4 * KIB)) == b"\xaa" * 4096
            assert "cow" not in done
            release.set()
        assert backend.root.read(20 * KIB, 4 * KIB) == b"\xaa" * 10 + b"\x86" * 100 + b"\xaa" * (4 * KIB - 110)
        backend.syncs_running -= 1
        await backend.write(16 * KIB, b"\x84" * 100)
        await backend.read(16 * KIB, 4 * KIB)
        assert backend.write_now(16 * KIB, b"\x85" * 100)  # no sync running: at once again
    assert_qemu_clean(chain3)


async def test_devices_write_off_the_loop_while_a_dropped_node_closes(chain3: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The close of a node that left the graph (an active commit's old top
    after the pivot) flushes everything written into it, in a worker
    thread: the devices count it as a sync running, as their own flushes."""
    from imgchain.chain import open_image
    from imgchain.graph import BlockGraph

    seen: list[int] = []
    real = trio.to_thread.run_sync
    graph = BlockGraph()

    async def watching(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(sum(b.syncs_running for b in graph.backends))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", watching)
    with backend_on(chain3) as backend:
        graph.backends.append(backend)
        create_image(str(tmp_path / "dropped.qcow2"), "qcow2", 1 << 20)
        dropped = open_image(str(tmp_path / "dropped.qcow2"), writable=True)
        dropped.write(0, b"\x11" * 4096)
        await graph.close_off_loop([dropped])
        assert seen == [1] and backend.syncs_running == 0
    assert qemu_img("check", tmp_path / "dropped.qcow2").returncode == 0
