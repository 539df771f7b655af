"""A job's early write-out of its target (`BlockFile.start_write_out`, sync_file_range).

The active commit copies into base with writes into the page cache, and the
fdatasync at READY then had to write everything copied (about a third of
the time to READY on the benchmark's chain). Every WRITE_OUT_STEP bytes it
now asks the kernel, in a worker thread, to start writing base's dirty
pages. What the kernel reports of the file's pages (cachestat, Linux 6.5)
is the proof: dirty pages turn into pages under writeback or clean ones
without any fdatasync, and nothing is made durable out of order (the
write-out is no barrier: the write-back's own syncs stay where they were).
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from pathlib import Path

import pytest
import trio

from imgchain.backend import BlockBackend
from imgchain.blockfile import BlockFile
from imgchain.chain import open_backing_chain
from imgchain.graph import BlockGraph
from imgchain.jobs.copy import WRITE_OUT_STEP
from imgchain.jobs.commit import create_commit
from imgchain.jobs.manager import JobManager

from .conftest import qemu_img, qemu_io

MIB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
_SYS_CACHESTAT = 451  # x86_64 and most others (Linux 6.5)


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


def dirty_pages(fd: int) -> int:
    """Pages of the file that are dirty and not yet under writeback."""
    libc = ctypes.CDLL(None, use_errno=True)
    whole, stat = _Range(0, 0), _Stat()
    if libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(whole), ctypes.byref(stat), 0) != 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            pytest.skip("cachestat needs Linux 6.5")
        raise OSError(err, os.strerror(err))
    return stat.dirty


def until_fewer_dirty(fd: int, limit: int, seconds: float = 10.0) -> int:
    deadline = time.monotonic() + seconds
    while (dirty := dirty_pages(fd)) >= limit and time.monotonic() < deadline:
        time.sleep(0.01)
    return dirty


def test_start_write_out_writes_dirty_pages_without_a_sync(tmp_path: Path) -> None:
    path = tmp_path / "f.raw"
    path.write_bytes(b"")
    f = BlockFile(str(path), writable=True)
    try:
        f.pwrite(0, os.urandom(32 * MIB))
        before = dirty_pages(f.fd)
        assert before >= 32 * MIB // PAGE // 2  # the kernel keeps them dirty for 30 s by default
        f.start_write_out()
        assert until_fewer_dirty(f.fd, before // 4) < before // 4
    finally:
        f.close()


async def test_the_active_commit_writes_base_out_as_it_copies(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    for name, backing, fmt in (("base.qcow2", None, None), ("top.qcow2", "base.qcow2", "qcow2")):
        qemu_img("create", "-q", "-f", "qcow2", *(("-b", backing, "-F", fmt) if backing else ()),
                 tmp_path / name, "64M", check=True)
    assert qemu_io(tmp_path / "top.qcow2", "write -P 0x33 0 48M").returncode == 0
    started: list[str] = []
    real = BlockFile.start_write_out

    def counted(self: BlockFile) -> None:
        started.append(os.path.basename(self.path))
        real(self)

    monkeypatch.setattr(BlockFile, "start_write_out", counted)
    graph = BlockGraph()
    top = open_backing_chain(str(tmp_path / "top.qcow2"), writable=True)
    graph.add_chain(top)
    backend = BlockBackend(top)
    graph.add_backend(backend)
    manager = JobManager(graph)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        job = await create_commit(manager, {"device": "drive0", "base-node": "base"})
        while job.status != "ready":
            await trio.sleep(0.01)
        job.complete()
        await job.done.wait()
        nursery.cancel_scope.cancel()
    assert job.error is None
    assert set(started) == {"base.qcow2"} and len(started) >= 48 * MIB // WRITE_OUT_STEP // 2
    for node in list(graph.nodes.values()):
        node.close()
    assert qemu_img("check", tmp_path / "base.qcow2").returncode == 0
    assert qemu_io(tmp_path / "base.qcow2", "read -P 0x33 0 48M").returncode == 0
