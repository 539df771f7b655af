"""Block status: what a driver says about a range of guest offsets.

The driver-level answer to QEMU's `bdrv_co_block_status`: a run of guest
bytes that is data at a host offset, reads as zeros (with or without a host
cluster kept for it), falls through to the backing node, or is a compressed
cluster that must be inflated.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Status(enum.Enum):
    DATA = "data"
    ZERO = "zero"
    UNALLOCATED = "unallocated"
    COMPRESSED = "compressed"


@dataclass(frozen=True)
class Extent:
    """`length` guest bytes from `guest_offset` with one status.

    `host_offset` is where DATA lies in the image file (and the kept cluster
    of an allocated ZERO); None where there is none."""

    guest_offset: int
    length: int
    status: Status
    host_offset: int | None = None

    @property
    def end(self) -> int:
        return self.guest_offset + self.length

    @property
    def allocated(self) -> bool:
        """Does this layer answer for the range (QEMU's BDRV_BLOCK_ALLOCATED)?"""
        return self.status is not Status.UNALLOCATED
