"""Preallocation ahead of a growing qcow2 file (QEMU's preallocate filter driver).

A guest writing to a fresh overlay makes its file grow at the end: every
copy-on-write appends a new cluster. On this kind of machine the costly part
of such a write is not the copy but the kernel's first touch of the memory
that becomes the new cluster's page cache (up to 165 µs per 64 KiB cluster,
against 17 µs to overwrite pages that exist; BENCHMARKS.md), and it is paid on
the loop's one thread. So, as QEMU's preallocate filter does with
`prealloc-size`, once writes come within half of `size` of the end of what is
prepared, one background thread prepares the next `size` bytes past the end:
it allocates them (`fallocate`, which never shrinks a file nor changes its
data, so it is safe beside writes in other threads) and has the kernel read
them ahead (`posix_fadvise` WILLNEED: no copy to the process), which puts
zeroed pages in the page cache. The writes then land on pages that exist,
and the first touch happens on the other CPU.

The file keeps no more than it holds data for: at close, after the last
preparation in flight has stopped, it is cut back to where data ends (the
file's size at open, or the end of the furthest write since; QEMU's filter
does the same with its `data_end`). A kill leaves a tail of zeros that no
refcount covers, which `qemu-img check` accepts as it is. Only qcow2 files
get this: a raw file's size is its guest-visible size. The daemon turns it on
for the process (`set_prealloc_size`), before any image is opened; offline
tools leave it off.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import TYPE_CHECKING

from .libc import call_checked

if TYPE_CHECKING:
    from .blockfile import BlockFile

DEFAULT_PREALLOC_SIZE = 16 << 20  # a mount's --prealloc-size (QEMU's prealloc-size is 128 MiB)
PREALLOC_ALIGN = 1 << 20  # sizes are multiples of this (QEMU's prealloc-align)
_STEP = 4 << 20  # the preparation reads ahead this much at a time (the kernel caps one call), and may stop between
FALLOC_FL_DEFAULT = 0  # allocate and extend the size; never shrinks, never changes data

_prealloc_size = 0  # off until a daemon sets it


def set_prealloc_size(size: int) -> None:
    """Preallocate `size` bytes ahead in every qcow2 file opened for writing
    from now on (0: never)."""
    global _prealloc_size
    _prealloc_size = size


def prealloc_size() -> int:
    return _prealloc_size


def allocate(fd: int, start: int, length: int) -> None:
    """fallocate(2) of a range, mode 0 (the os module has only
    posix_fallocate, whose fallback writes zeros over whatever is there);
    OSError when it fails (EOPNOTSUPP on a file system without it, ENOSPC)."""
    call_checked("fallocate", fd, FALLOC_FL_DEFAULT, start, length)


class Preallocation:
    """The prepared tail of one file opened for writing.

    Invariant: `end` is where the prepared tail ends (the file's size at
    least that far); `idle` is clear exactly while a preparation is queued
    or running, and only the owner of the file queues one."""

    def __init__(self, file: BlockFile, size: int) -> None:
        self.file = file
        self.size = size
        self.end = file.data_end
        self.idle = threading.Event()
        self.idle.set()
        self.stopping = False  # the file is closing: a running preparation stops at its next step
        self.failed: OSError | None = None  # the file system refused: no more preparations

    def wrote(self, end: int) -> None:
        """A write went to `end`: queue the next preparation once less than
        half of `size` is left ahead of it (one at a time)."""
        if end > self.end - self.size // 2 and self.idle.is_set() and self.failed is None:
            self.idle.clear()
            _PREPARER.submit(self, max(self.end, end))

    def prepare(self, start: int) -> None:
        """In the preparer's thread: allocate `size` bytes from `start` and
        read them ahead into the page cache, a step at a time."""
        try:
            allocate(self.file.fd, start, self.size)
            for at in range(start, start + self.size, _STEP):
                if self.stopping:
                    return
                os.posix_fadvise(self.file.fd, at, min(_STEP, start + self.size - at), os.POSIX_FADV_WILLNEED)
            self.end = start + self.size
        except OSError as exc:
            self.failed = exc  # the writes extend the file themselves, as without preallocation
        finally:
            self.idle.set()

    def finish(self) -> None:
        """Before the file closes: stop the preparation in flight (it stops
        within one step) and cut the file back to where its data ends."""
        self.stopping = True
        self.idle.wait()
        if os.fstat(self.file.fd).st_size > self.file.data_end:
            os.ftruncate(self.file.fd, self.file.data_end)


class Preparer:
    """The one background thread that prepares tails, in the order asked
    (started on first use; a forked child starts its own)."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Preallocation, int]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, prealloc: Preallocation, start: int) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, args=(self._queue,),
                                            name="imgchain-preallocate", daemon=True)
            self._thread.start()
        self._queue.put((prealloc, start))

    @staticmethod
    def _serve(asked: queue.SimpleQueue[tuple[Preallocation, int]]) -> None:
        while True:
            prealloc, start = asked.get()
            prealloc.prepare(start)


_PREPARER = Preparer()
