"""Format probing from an image's first bytes, as QEMU's probe does for the subset.

qcow2 is recognised by its magic; anything else is raw (QEMU's fallback).
"""

from __future__ import annotations

QCOW2_MAGIC = b"QFI\xfb"
QCOW2_PROBE_SIZE = 4


def probe_format(head: bytes) -> str:
    """Return "qcow2" or "raw" for a file whose first bytes are `head`."""
    return "qcow2" if head[:4] == QCOW2_MAGIC else "raw"
