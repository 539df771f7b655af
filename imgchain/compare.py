"""Comparing the guest-visible content of two images (qemu-img compare).

Ranges that block status shows as zeros in both chains are skipped without
reading; everything else is read in chunks and compared. A size difference
is allowed unless strict, as long as the longer image's tail reads as zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

from .chain import close_chain, open_backing_chain
from .node import Node

CHUNK = 1 << 20
SECTOR = 512


@dataclass(frozen=True)
class CompareResult:
    identical: bool
    message: str
    offset: int | None = None


def _first_difference(a: bytes, b: bytes) -> int:
    """Index of the first differing byte, rounded down to a sector as qemu reports it."""
    for i in range(0, len(a), SECTOR):
        if a[i:i + SECTOR] != b[i:i + SECTOR]:
            return i
    raise AssertionError("buffers are equal")


def _compare_range(n1: Node, n2: Node, start: int, end: int, strict: bool) -> CompareResult | None:
    for pos in range(start, end, CHUNK):
        n = min(CHUNK, end - pos)
        z1, z2 = n1.reads_as_zero(pos, n), n2.reads_as_zero(pos, n)
        if strict and z1 != z2:
            return CompareResult(False, f"Strict mode: Offset {pos} block status mismatch!", pos)
        if z1 and z2:
            continue
        d1, d2 = n1.read(pos, n), n2.read(pos, n)
        if d1 != d2:
            at = pos + _first_difference(d1, d2)
            return CompareResult(False, f"Content mismatch at offset {at}!", at)
    return None


def compare_nodes(n1: Node, n2: Node, strict: bool = False) -> CompareResult:
    """Compare two opened chains."""
    if strict and n1.size != n2.size:
        return CompareResult(False, "Strict mode: Image size mismatch!")
    common = min(n1.size, n2.size)
    result = _compare_range(n1, n2, 0, common, strict)
    if result is None and n1.size != n2.size:
        longer = n1 if n1.size > n2.size else n2
        for pos in range(common, longer.size, CHUNK):
            n = min(CHUNK, longer.size - pos)
            if longer.reads_as_zero(pos, n):
                continue
            data = longer.read(pos, n)
            if data.count(0) != n:
                at = pos + _first_difference(data, bytes(n))
                return CompareResult(False, f"Content mismatch at offset {at}!", at)
    return result or CompareResult(True, "Images are identical.")


def compare_images(path1: str, path2: str, strict: bool = False,
                   trust_backing: bool = False) -> CompareResult:
    """Compare the chains of two images by content."""
    n1 = open_backing_chain(path1, trust_backing=trust_backing)
    try:
        n2 = open_backing_chain(path2, trust_backing=trust_backing)
        try:
            return compare_nodes(n1, n2, strict)
        finally:
            close_chain(n2)
    finally:
        close_chain(n1)
