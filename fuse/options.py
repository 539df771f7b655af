"""What a mount is asked to do: the options `imgchain mount` passes to its daemon.

Kept apart from the daemon module so the command line can build them without
loading pyfuse3 (a daemon that cannot load it reports that itself)."""

from __future__ import annotations

from dataclasses import dataclass

from imgchain.metacache import DEFAULT_CACHE_SIZE, MIN_CACHE_SIZE

__all__ = ["DEFAULT_CACHE_SIZE", "MIN_CACHE_SIZE", "MountOptions"]


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
