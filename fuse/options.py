"""What a mount is asked to do: the options `imgchain mount` passes to its daemon.

Kept apart from the daemon module so the command line can build them without
loading pyfuse3 (a daemon that cannot load it reports that itself)."""

from __future__ import annotations

from dataclasses import dataclass

from imgchain.metacache import DEFAULT_CACHE_SIZE, MIN_CACHE_SIZE
from imgchain.preallocate import DEFAULT_PREALLOC_SIZE, PREALLOC_ALIGN

__all__ = ["DEFAULT_CACHE_SIZE", "DEFAULT_PREALLOC_SIZE", "MIN_CACHE_SIZE", "MountOptions", "PREALLOC_ALIGN"]


@dataclass
class MountOptions:
    image: str
    mountpoint: str
    read_only: bool = False
    allow_other: bool = False
    qmp: str | None = None
    device: str = "drive0"
    trust_backing: bool = False
    cache_size: int = DEFAULT_CACHE_SIZE  # bytes of metadata caches (QEMU's cache-size)
    prealloc_size: int = DEFAULT_PREALLOC_SIZE  # bytes prepared past a growing file's end (QEMU's prealloc-size)
