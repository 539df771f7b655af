"""Linux native AIO (io_submit) from Python, for tests that need several
writes in flight on one FUSE file at once.

A FUSE file takes one synchronous write at a time (the kernel holds the
inode lock until the daemon answers), so writes from threads arrive one
after the other. Asynchronous O_DIRECT writes do not: io_submit returns once
the request is queued, as fio's libaio engine relies on. `Aio` submits
reads and writes from page-aligned buffers and reaps their completions in
the order they complete.
"""

from __future__ import annotations

import ctypes
import mmap
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_IO_SETUP, SYS_IO_DESTROY, SYS_IO_GETEVENTS, SYS_IO_SUBMIT = 206, 207, 208, 209  # x86_64
IOCB_CMD_PREAD, IOCB_CMD_PWRITE = 0, 1


class _Iocb(ctypes.Structure):
    _fields_ = [("aio_data", ctypes.c_uint64), ("aio_key", ctypes.c_uint32), ("aio_rw_flags", ctypes.c_int32),
                ("aio_lio_opcode", ctypes.c_uint16), ("aio_reqprio", ctypes.c_int16),
                ("aio_fildes", ctypes.c_uint32), ("aio_buf", ctypes.c_uint64), ("aio_nbytes", ctypes.c_uint64),
                ("aio_offset", ctypes.c_int64), ("aio_reserved2", ctypes.c_uint64),
                ("aio_flags", ctypes.c_uint32), ("aio_resfd", ctypes.c_uint32)]


class _IoEvent(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                ("res2", ctypes.c_int64)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


class Aio:
    """Asynchronous O_DIRECT I/O on one file; each request has a name."""

    def __init__(self, path: os.PathLike[str] | str, depth: int = 64) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        self.ctx = ctypes.c_ulong(0)
        _check(_libc.syscall(SYS_IO_SETUP, depth, ctypes.byref(self.ctx)), "io_setup")
        self._pending: dict[int, tuple[str, _Iocb, mmap.mmap]] = {}
        self._next = 1

    def _submit(self, name: str, opcode: int, offset: int, buffer: mmap.mmap, length: int) -> None:
        tag, self._next = self._next, self._next + 1
        iocb = _Iocb(aio_data=tag, aio_lio_opcode=opcode, aio_fildes=self.fd,
                     aio_buf=ctypes.addressof(ctypes.c_char.from_buffer(buffer)),
                     aio_nbytes=length, aio_offset=offset)
        pointers = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(iocb))
        self._pending[tag] = (name, iocb, buffer)
        _check(_libc.syscall(SYS_IO_SUBMIT, self.ctx, 1, pointers), f"io_submit {name}")

    def write(self, name: str, offset: int, data: bytes) -> None:
        buffer = mmap.mmap(-1, max(len(data), mmap.PAGESIZE))
        buffer[:len(data)] = data
        self._submit(name, IOCB_CMD_PWRITE, offset, buffer, len(data))

    def read(self, name: str, offset: int, length: int) -> mmap.mmap:
        buffer = mmap.mmap(-1, max(length, mmap.PAGESIZE))
        self._submit(name, IOCB_CMD_PREAD, offset, buffer, length)
        return buffer

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def reap(self, count: int, timeout: float = 60) -> list[tuple[str, int]]:
        """Wait for `count` completions: (name, result: bytes done or -errno), in completion order."""
        done: list[tuple[str, int]] = []
        events = (_IoEvent * count)()
        while len(done) < count:
            spec = _Timespec(int(timeout), int(timeout % 1 * 1e9))
            got = _check(_libc.syscall(SYS_IO_GETEVENTS, self.ctx, 1, count - len(done), events,
                                       ctypes.byref(spec)), "io_getevents")
            assert got, f"no completion within {timeout} s; in flight: {[n for n, _, _ in self._pending.values()]}"
            for event in events[:got]:
                name, _, _ = self._pending.pop(event.data)
                done.append((name, event.res))
        return done

    def close(self) -> None:
        if self._pending:
            self.reap(len(self._pending))
        _libc.syscall(SYS_IO_DESTROY, self.ctx)
        os.close(self.fd)
