"""The raw driver: the image file is the guest content, byte for byte.

A raw image has no backing of its own and no metadata, so it can be the base
of a chain and the target of a commit. Block status reports holes of a sparse
file as zero (SEEK_DATA/SEEK_HOLE, as QEMU's file-posix does) so `map` can
show them.
"""

from __future__ import annotations

import errno
import os
from typing import Callable, Iterator

from .blockfile import BlockFile
from .errors import ImageIOError
from .extent import Extent, Status


class RawDriver:
    """One raw image file."""

    format_name = "raw"
    backing_file = None
    backing_format = None
    cluster_size = None

    def __init__(self, file: BlockFile, filename: str) -> None:
        self.file = file
        self.filename = filename
        self.size = -(-file.size() // 512) * 512  # QEMU counts whole sectors

    def block_status(self, offset: int, length: int, want_zero: bool = True) -> list[Extent]:
        """Data extents at their own offsets; holes of a sparse file as zero
        (looked up only when `want_zero`: a plain read needs no lseek)."""
        if not want_zero and offset + length <= self.size:
            return [Extent(offset, length, Status.DATA, offset)]
        end = min(offset + length, self.size)
        out: list[Extent] = []
        pos = offset
        while pos < end:
            data, hole = self._data_and_hole(pos)
            if data > pos:
                n = min(data, end) - pos
                out.append(Extent(pos, n, Status.ZERO, pos))
            else:
                n = min(hole, end) - pos
                out.append(Extent(pos, n, Status.DATA, pos))
            pos += n
        if offset + length > end:
            out.append(Extent(end, offset + length - end, Status.ZERO, None))
        return out

    def _data_and_hole(self, pos: int) -> tuple[int, int]:
        """(start of data at/after pos, start of the hole after that data)."""
        try:
            data = os.lseek(self.file.fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole up to EOF
                return self.size, self.size
            return pos, self.size
        if data > pos:
            return data, data
        hole = os.lseek(self.file.fd, pos, os.SEEK_HOLE)
        return pos, hole

    def write(self, offset: int, data: bytes | bytearray | memoryview,
              read_below: Callable[[int, int], bytes]) -> None:
        self._require_writable()
        self.file.pwrite(offset, data)

    def allocation_at(self, offset: int, length: int) -> None:
        """A raw file allocates nothing: never a write in flight to wait for."""
        return None

    def begin_allocation(self, offset: int, data: object, source: object) -> None:
        """Nothing to allocate: every write lands in place (`write`)."""
        return None

    def copy_on_write_now(self, offset: int, data: object, cluster: object) -> None:
        """Nothing to copy: every write lands in place (`write`)."""
        return None

    def in_place_host(self, offset: int) -> int | None:
        """Where a write at guest `offset` lands: the same offset, if writable."""
        return offset if self.file.writable else None

    def write_zeroes(self, offset: int, length: int, read_below: Callable[[int, int], bytes]) -> None:
        self._require_writable()
        step = 1 << 20
        for pos in range(offset, offset + length, step):
            self.file.pwrite(pos, bytes(min(step, offset + length - pos)))

    def grow(self, size: int) -> None:
        """Make the image `size` bytes long (a commit base smaller than its top); never shrinks."""
        self._require_writable()
        if size > self.size:
            os.ftruncate(self.file.fd, size)
            self.size = size

    def _require_writable(self) -> None:
        if not self.file.writable:
            raise ImageIOError(f"{self.filename}: image is opened read-only", errno.EROFS)

    def write_back(self) -> None:
        """Raw images keep no metadata in memory."""

    def write_back_steps(self) -> Iterator[None]:
        return iter(())

    def flush(self) -> None:
        if self.file.writable:
            self.file.flush()

    def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        raise ImageIOError(f"{self.filename}: Driver 'raw' does not support backing files")

    def close(self) -> None:
        self.file.close()
