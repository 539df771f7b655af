"""Copy-on-write off the loop (issue 11 point 5), through real FUSE mounts.

A small write into a cluster the top does not hold allocates the cluster and
copies its old bytes in a worker thread; the L2 entry points at it only once
the data is written. These tests hold that data half with blkdebug's "cow"
rule (an await while the cluster is in flight) and check, against a model of
the guest's bytes and with `qemu-img check` afterwards:

- a later write to the cluster waits for it and lands after it (its bytes
  win), a read meanwhile sees the old bytes, and a write elsewhere is served
  while it is held;
- a failed data half fails that write alone (EIO), loses nothing, and leaks
  no cluster; a write that waited for it then does its own copy-on-write;
- a stream or an active commit that reaches the cluster waits for it, and
  a snapshot's drain too;
- concurrent writers sharing clusters end with the model's bytes.
"""

from __future__ import annotations

import errno
import json
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

from imgchain.create import create_image
from imgchain.qmp_client import QmpClient
from imgchain.runtime import find_by_mountpoint

from .native_aio import Aio
from .conftest import assert_qemu_clean
from .jobs_helpers import guest_content
from .mounting import mount

KIB, MIB = 1024, 1 << 20
CLUSTER = 64 * KIB
SIZE = 4 * MIB
HELD_MS = 4000  # how long the data half of the first write is held


def make_chain(tmp: Path) -> tuple[Path, bytearray]:
    """base.raw (random bytes) <- top.qcow2 (64 KiB clusters, empty); the model."""
    base = random.Random(7).randbytes(SIZE)
    (tmp / "base.raw").write_bytes(base)
    create_image(str(tmp / "top.qcow2"), "qcow2", SIZE, "base.raw", "raw")
    return tmp / "top.qcow2", bytearray(base)


@contextmanager
def mounted(tmp: Path, top: Path, rules: list[dict[str, object]]) -> Iterator[Path]:
    """Mount `top` with blkdebug rules; unmounted (and checked) afterwards."""
    rules_file = tmp / "rules.json"
    rules_file.write_text(json.dumps(rules))
    os.environ["IMGCHAIN_BLKDEBUG"] = str(rules_file)
    try:
        with mount(top, tmp / "disk.img") as disk:
            os.environ.pop("IMGCHAIN_BLKDEBUG")
            yield disk
    finally:
        os.environ.pop("IMGCHAIN_BLKDEBUG", None)


def hold_cow(top: Path, cluster: int, **extra: object) -> dict[str, object]:
    """A rule holding the data half of the first copy-on-write of a cluster."""
    return {"image": str(top), "op": "cow", "offset": cluster * CLUSTER, "length": CLUSTER,
            "delay_ms": HELD_MS, "once": True, **extra}


def drop_page_cache(path: Path) -> None:
    """Evict one file's pages from the page cache (written back first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def check_image(top: Path, model: bytearray) -> None:
    assert_qemu_clean(top)  # no leaked cluster, no corruption
    assert guest_content(top) == bytes(model)


def settle() -> None:
    time.sleep(0.5)  # let what was submitted reach the daemon first (order only; nothing is timed)


def ok(done: list[tuple[str, int]], length: int = 4 * KIB) -> list[str]:
    """The names in completion order, each having done all its bytes."""
    assert all(res == length for _, res in done), done
    return [name for name, _ in done]


def test_a_write_to_a_cluster_in_flight_waits_and_lands_after_it(tmp_path: Path) -> None:
    top, model = make_chain(tmp_path)
    c = 1 * CLUSTER
    a, b, late, elsewhere = (bytes([v]) * 4 * KIB for v in (0xA1, 0xB2, 0xC3, 0xD4))
    with mounted(tmp_path, top, [hold_cow(top, 1)]) as disk:
        aio = Aio(disk)
        aio.write("a", c + 4 * KIB, a)  # its copy-on-write is held
        settle()
        old = aio.read("read", c, CLUSTER)
        aio.write("b", c + 8 * KIB, b)  # same cluster, other bytes: waits
        aio.write("late", c + 4 * KIB, late)  # the very bytes of a: waits, then wins
        aio.write("elsewhere", 5 * CLUSTER, elsewhere)  # another cluster: served meanwhile
        done = aio.reap(5)
        aio.close()
        assert dict(done)["read"] == CLUSTER
        assert old[:CLUSTER] == bytes(model[c:c + CLUSTER])  # a has not completed: the old bytes
        order = ok([d for d in done if d[0] != "read"])
        assert [name for name, _ in done].index("read") < order.index("a")
        assert order.index("elsewhere") < order.index("a") < min(order.index("b"), order.index("late"))
        model[c + 4 * KIB:c + 8 * KIB] = late
        model[c + 8 * KIB:c + 12 * KIB] = b
        model[5 * CLUSTER:5 * CLUSTER + 4 * KIB] = elsewhere
        assert disk.read_bytes() == bytes(model)
    check_image(top, model)


def test_a_failed_copy_on_write_fails_that_write_alone_and_leaks_nothing(tmp_path: Path) -> None:
    top, model = make_chain(tmp_path)
    c = 2 * CLUSTER
    with mounted(tmp_path, top, [hold_cow(top, 2, errno="EIO")]) as disk:
        aio = Aio(disk)
        aio.write("failed", c, b"\xee" * 4 * KIB)
        settle()
        aio.write("waiter", c + 60 * KIB, b"\x5a" * 4 * KIB)  # waits, then copies on write itself
        done = aio.reap(2)
        aio.close()
        assert done == [("failed", -errno.EIO), ("waiter", 4 * KIB)]
        model[c + 60 * KIB:c + 64 * KIB] = b"\x5a" * 4 * KIB
        assert disk.read_bytes() == bytes(model)
    check_image(top, model)


def _qmp(disk: Path) -> QmpClient:
    record = find_by_mountpoint(str(disk))
    assert record is not None
    return QmpClient(record.socket, timeout=120)


def _wait_event(qmp: QmpClient, name: str) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for event in qmp.events:
            if event["event"] == name:
                qmp.events.remove(event)
                return event
        qmp.execute("query-version")  # collects what arrived
        time.sleep(0.02)
    raise AssertionError(f"no {name} within 120 s")


def _stream(qmp: QmpClient, tmp: Path) -> list[Path]:
    qmp.execute("block-stream", device="drive0")
    done = _wait_event(qmp, "BLOCK_JOB_COMPLETED")
    assert "error" not in done["data"], done
    return [tmp / "top.qcow2"]


def _active_commit(qmp: QmpClient, tmp: Path) -> list[Path]:
    qmp.execute("block-commit", device="drive0")
    _wait_event(qmp, "BLOCK_JOB_READY")
    qmp.execute("block-job-complete", device="drive0")
    done = _wait_event(qmp, "BLOCK_JOB_COMPLETED")
    assert "error" not in done["data"], done
    return [tmp / "base.raw"]  # the device's root now


def _snapshot(qmp: QmpClient, tmp: Path) -> list[Path]:
    qmp.execute("blockdev-snapshot-sync", device="drive0", **{"snapshot-file": str(tmp / "snap.qcow2")})
    return [tmp / "top.qcow2", tmp / "snap.qcow2"]  # the write is in the old top, under the new one


@pytest.mark.parametrize("change", [_stream, _active_commit, _snapshot], ids=["stream", "active-commit", "snapshot"])
def test_a_job_or_graph_change_waits_for_a_copy_on_write_in_flight(
        tmp_path: Path, change: Callable[[QmpClient, Path], list[Path]]) -> None:
    """The stream would allocate the cluster a second time and the mirror copy
    its old bytes; every graph change drains it first. When the job ends or
    the snapshot answers, the held write has completed."""
    top, model = make_chain(tmp_path)
    c = 3 * CLUSTER
    data = b"\x77" * 4 * KIB
    with mounted(tmp_path, top, [hold_cow(top, 3)]) as disk:
        aio = Aio(disk)
        aio.write("a", c + 12 * KIB, data)
        settle()
        images = change(_qmp(disk), tmp_path)
        assert ok(aio.reap(1, timeout=0)) == ["a"]
        aio.close()
        model[c + 12 * KIB:c + 16 * KIB] = data
        assert disk.read_bytes() == bytes(model)
    for image in images:
        if image.suffix == ".qcow2":
            check_image(image, model)
        else:
            assert image.read_bytes() == bytes(model)


def test_concurrent_writers_sharing_clusters_match_the_model(tmp_path: Path) -> None:
    """Sixteen writes in flight at a time over 64 clusters whose old bytes
    are not in the page cache: a cluster's first write copies in the worker
    thread and the writes that follow meet it in flight (never two writes of
    the same block at once, so the model is exact)."""
    top, model = make_chain(tmp_path)
    rng = random.Random(11)
    blocks = SIZE // (4 * KIB)
    drop_page_cache(tmp_path / "base.raw")  # cold: the copies go to the worker thread
    with mount(top, tmp_path / "disk.img") as disk:
        aio = Aio(disk)
        busy: set[int] = set()
        for n in range(3000):
            if aio.in_flight == 16:
                for name, res in aio.reap(1):
                    assert res == 4 * KIB, (name, res)
                    busy.discard(int(name))
            block = rng.choice([i for i in rng.sample(range(blocks), 32) if i not in busy])
            data = rng.randbytes(4 * KIB)
            model[block * 4 * KIB:(block + 1) * 4 * KIB] = data
            busy.add(block)
            aio.write(str(block), block * 4 * KIB, data)
        aio.close()
        assert disk.read_bytes() == bytes(model)
    check_image(top, model)
