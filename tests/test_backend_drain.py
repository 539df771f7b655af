"""BlockBackend: in-flight accounting, drain with parent hooks, and blkdebug fault injection."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import trio
import trio.testing

from imgchain.backend import BlockBackend
from imgchain.blkdebug import BlkDebug, Rule
from imgchain.chain import close_chain, open_backing_chain
from imgchain.errors import ImgchainError
from imgchain.qmp import QmpSession



class Device:
    """A stand-in device that records the hooks (the FUSE export implements the same)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def drained_begin(self) -> None:
        self.calls.append("begin")

    def drained_poll(self) -> bool:
        return False

    def drained_end(self) -> None:
        self.calls.append("end")


@pytest.fixture
def backend(chain3: Path):
    top = open_backing_chain(str(chain3), writable=True)
    blk = BlockBackend(top)
    blk.dev_ops = Device()
    yield blk
    close_chain(top)


async def test_requests_wait_while_drained_and_none_fails(backend: BlockBackend) -> None:
    results: list[bytes] = []

    async def read(i: int) -> None:
        results.append(await backend.read(i * 4096, 1))

    async with trio.open_nursery() as nursery:
        async with backend.drained():
            for i in range(5):
                nursery.start_soon(backend.write, i * 4096, bytes([i + 1]) * 10)
                nursery.start_soon(read, i)
            await trio.testing.wait_all_tasks_blocked()
            assert backend.in_flight == 0  # nothing ran inside the drained section
            assert backend.root.read(0, 1) == b"\xaa"
        # drained_end lets them all run
    assert len(results) == 5
    assert [backend.root.read(i * 4096, 1) for i in range(5)] == [bytes([i + 1]) for i in range(5)]
    assert backend.dev_ops.calls == ["begin", "end"]


async def test_drain_waits_for_in_flight_requests(backend: BlockBackend) -> None:
    backend.debug = BlkDebug([Rule(image="top", op="write", delay_ms=200)])
    order: list[str] = []

    async def slow_write() -> None:
        await backend.write(0, b"\x01" * 512)
        order.append("write done")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_write)
        await trio.testing.wait_all_tasks_blocked()
        assert backend.in_flight == 1
        async with backend.drained():
            order.append("drained")
            assert backend.in_flight == 0
    assert order == ["write done", "drained"]


async def test_nested_drains_end_once(backend: BlockBackend) -> None:
    async with backend.drained():
        async with backend.drained():
            assert backend.quiesce_counter == 2
        assert backend.quiesce_counter == 1
    assert backend.quiesce_counter == 0
    assert backend.dev_ops.calls == ["begin", "end"]


async def test_blkdebug_errno_once_and_by_range(backend: BlockBackend) -> None:
    backend.debug = BlkDebug([Rule(image="base", op="read", offset=8192, length=4096, errno=errno.EIO, once=True)])
    assert await backend.read(0, 4096) == b"\xaa" * 4096  # outside the range
    with pytest.raises(OSError) as info:
        await backend.read(8000, 1000)
    assert info.value.errno == errno.EIO
    assert await backend.read(8000, 1000) == b"\xaa" * 1000  # once: spent
    backend.debug = BlkDebug([Rule(image=str(backend.root.filename), op="flush", errno=errno.ENOSPC)])
    with pytest.raises(OSError) as info:
        await backend.flush()
    assert info.value.errno == errno.ENOSPC
    assert backend.in_flight == 0


async def test_blkdebug_rules_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"image": "top", "op": "write", "errno": "ENOSPC", "delay_ms": 5}]))
    monkeypatch.setenv("IMGCHAIN_BLKDEBUG", str(rules))
    debug = BlkDebug.from_environment()
    assert debug.rules[0].errno == errno.ENOSPC and debug.rules[0].delay_ms == 5
    rules.write_text(json.dumps([{"image": "top", "op": "erase"}]))
    with pytest.raises(ImgchainError, match="each rule needs"):
        BlkDebug.from_environment()
    monkeypatch.delenv("IMGCHAIN_BLKDEBUG")
    assert BlkDebug.from_environment().rules == []


def test_qmp_session_reassembles_split_input() -> None:
    session = QmpSession({})
    assert session.feed(b'{"execute": "qmp_capa') == []
    assert session.feed(b'bilities"}{"execute"') == [{"execute": "qmp_capabilities"}]
    assert session.feed(b': "x"}\n') == [{"execute": "x"}]
    out = session.feed(b'{"a": ]}\n{"execute": "y"}\n')
    assert out[0][0] == "reply" and out[0][1]["error"]["class"] == "GenericError"
    assert out[1] == {"execute": "y"}


async def test_resolved_cluster_map_follows_writes(backend: BlockBackend) -> None:
    """Reads resolve a cluster's location once; writes and zero writes move it."""
    assert await backend.read(4096, 100) == b"\xaa" * 100          # resolved to base.raw
    assert backend.mapped_clusters()
    await backend.write(4096, b"\x01" * 10)                         # COW into top
    assert await backend.read(4096, 100) == b"\x01" * 10 + b"\xaa" * 90
    await backend.write_zeroes(0, 3 * 4096)                          # zero clusters hide base
    assert await backend.read(4096, 100) == bytes(100)
    await backend.write(4096 + 50, b"\x02")                          # reallocated cluster
    assert await backend.read(4096, 100) == bytes(50) + b"\x02" + bytes(49)
    for off in range(0, 1 << 20, 65536):                             # every cluster, then again
        assert await backend.read(off, 4096) == backend.root.read(off, 4096)
    backend.invalidate_map()
    assert not backend.mapped_clusters()
