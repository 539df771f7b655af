"""Positional I/O on one image file (QEMU's file-posix protocol node).

Only positional calls (`os.pread`/`os.pwrite`), never a shared file position.
Reads past the end of the file return zeros, as QEMU's protocol layer does for
the partly written last cluster of a qcow2 image.

`flush` (fdatasync) may run in worker threads, several at once; the file
counts them so that a caller can ask whether one that started after a given
moment has completed (`sync_mark`, `durable_since`): an ordering barrier that
somebody else's sync already provides need not be paid again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading

from .libc import libc_function
from .locks import Perms, apply_locks
from .preallocate import Preallocation

IOV_MAX = 1024  # buffers one pwritev call takes (Linux's UIO_MAXIOV)
_ZEROS = memoryview(bytes(1 << 20))


SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>


def zero_fill(view: memoryview) -> None:
    """Set every byte of a writable buffer to zero."""
    for start in range(0, len(view), len(_ZEROS)):
        n = min(len(_ZEROS), len(view) - start)
        view[start:start + n] = _ZEROS[:n]


class BlockFile:
    """One opened image file, holding QEMU's lock bytes for `lock` (held, shared).

    A file opened for writing knows where its data ends (`data_end`: its size
    at open, or the end of the furthest write since), for a `Preallocation`
    of its tail (imgchain.preallocate) to be cut back to at close."""

    def __init__(self, path: str, writable: bool, lock: Perms | None = None) -> None:
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        self.path = path
        self.writable = writable
        self.fd = os.open(path, flags)
        # syncs started so far, and the highest start number of a completed one
        self._syncs_started, self._durable = 0, -1
        self._sync_count = threading.Lock()
        self.sync_failed = False  # Invariant: set once an fdatasync failed (see flush)
        # Invariant: no write through this file ended past data_end (infinite when read-only).
        self.data_end: float | int = os.fstat(self.fd).st_size if writable else float("inf")
        self._extending = threading.Lock()  # writes past data_end, from any thread
        self.preallocation: Preallocation | None = None
        if lock is not None:
            try:
                apply_locks(self.fd, path, lock)
            except BaseException:
                os.close(self.fd)
                raise

    def pread(self, offset: int, length: int) -> bytes:
        """Read `length` bytes; whatever lies past EOF reads as zeros."""
        data = os.pread(self.fd, length, offset)
        while len(data) < length:
            more = os.pread(self.fd, length - len(data), offset + len(data))
            if not more:
                return data + bytes(length - len(data))
            data += more
        return data

    def pread_into(self, offset: int, view: memoryview) -> None:
        """Fill a buffer from the file; whatever lies past EOF reads as zeros."""
        while view:
            done = os.preadv(self.fd, [view], offset)
            if not done:
                zero_fill(view)
                return
            view = view[done:]
            offset += done

    def preallocate(self, size: int) -> None:
        """Keep `size` bytes prepared past the end of the data (see
        imgchain.preallocate), until the file closes."""
        self.preallocation = Preallocation(self, size)

    def _extended(self, end: int) -> None:
        """A write is about to end at `end`, past data_end."""
        with self._extending:
            self.data_end = max(self.data_end, end)
            if self.preallocation is not None:
                self.preallocation.wrote(end)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of `data` (a short write is continued)."""
        if offset + len(data) > self.data_end:
            self._extended(offset + len(data))
        done = os.pwrite(self.fd, data, offset)
        if done == len(data):
            return
        view = memoryview(data)[done:]
        offset += done
        while view:
            done = os.pwrite(self.fd, view, offset)
            view = view[done:]
            offset += done

    def pwritev(self, offset: int, parts: list[bytes | bytearray | memoryview]) -> None:
        """Write several buffers back to back without joining them first."""
        for i in range(0, len(parts), IOV_MAX):
            chunk = parts[i:i + IOV_MAX]
            total = sum(len(p) for p in chunk)
            if offset + total > self.data_end:
                self._extended(offset + total)
            done = os.pwritev(self.fd, chunk, offset)
            if done < total:  # a short write: finish the rest the simple way
                self.pwrite(offset + done, b"".join(bytes(p) for p in chunk)[done:])
            offset += total

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def allocated_bytes(self) -> int:
        """Bytes the file occupies on disk (qemu-img's actual-size)."""
        return os.fstat(self.fd).st_blocks * 512

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self.data_end = size

    def flush(self) -> None:
        """fdatasync. Once one has failed, every later flush of this file
        fails too (`sync_failed`): Linux reports a failed write-back to one
        fdatasync only and may have dropped the pages, so a later one that
        succeeds proves nothing (QEMU's file-posix does the same)."""
        if self.sync_failed:
            raise OSError(errno.EIO, f"an earlier sync of {self.path} failed: its data may be lost")
        with self._sync_count:
            number = self._syncs_started
            self._syncs_started += 1
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            if exc.errno not in (errno.EBADF, errno.EINVAL):
                self.sync_failed = True
            raise
        with self._sync_count:
            self._durable = max(self._durable, number)

    def start_write_out(self) -> None:
        """Ask the kernel to start writing the file's dirty pages to disk,
        without waiting for the disk and without making anything durable
        (sync_file_range with SYNC_FILE_RANGE_WRITE: no journal commit, no
        barrier): a later flush finds less to write. Advice only: errors
        are left to that flush."""
        libc_function("sync_file_range")(self.fd, 0, 0, SYNC_FILE_RANGE_WRITE)

    def sync_mark(self) -> int:
        """A moment: syncs that start from now on have this number or more."""
        with self._sync_count:
            return self._syncs_started

    def durable_since(self, mark: int) -> bool:
        """Has a sync that started at or after `mark` completed (so everything
        written before `mark` is on disk)?"""
        with self._sync_count:
            return self._durable >= mark

    def close(self) -> None:
        """Close the descriptor (and its locks); a preallocated tail is cut
        back first."""
        if self.fd >= 0 and self.preallocation is not None:
            # a tail left (the cut failed) is zeros that no refcount covers, as after a kill
            with contextlib.suppress(OSError):
                self.preallocation.finish()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
