"""Metadata caches: decoded L2 tables and refcount blocks by host offset, in one bounded pool.

Write-through: callers change an entry in the cached table and write the
bytes themselves, so the cache never holds dirty state and a crash loses
nothing that was issued (the qcow2 driver's dirty L2 tables are held by
`qcow2_pending` until they are written back). Jobs that rewrite tables
behind a driver call `invalidate`. Never an `lru_cache` on methods.

Every `MetadataCache` of the process draws on one `CachePool`, a
least-recently-used set of tables bounded in bytes, whatever the number of
images open (locked: a node dropped by a job is closed, and its last metadata
written back, in a worker thread while the loop goes on): QEMU's qcow2 `cache-size` option, but for the whole chain (a
2000-layer chain costs what a one-layer chain does). `set_cache_size`
divides the process's budget between the pool and the block backends'
cluster maps (imgchain.backend); a mount sets it from `--cache-size`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from itertools import count
from typing import Callable, Generic, TypeVar

T = TypeVar("T")

DEFAULT_CACHE_SIZE = 16 << 20  # a mount's --cache-size when none is given
MIN_CACHE_SIZE = 1 << 20
MAP_SHARE = 4  # the cluster maps get 1/MAP_SHARE of the budget, the tables the rest
DIRTY_SHARE = 4  # a driver writes back once its dirty tables pass 1/DIRTY_SHARE of the pool
_SLOT_SHIFT = 57  # host offsets of tables stay below 2**56 (the entries' offset mask)
_OFFSET_MASK = (1 << _SLOT_SHIFT) - 1


class CachePool:
    """Decoded tables of every cache in one least-recently-used order, at
    most `capacity` bytes of them (at least one table is always kept, so a
    table larger than the pool still works, one at a time)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.lock = threading.Lock()  # every change of tables and used, and every lookup
        # (cache slot << _SLOT_SHIFT | host offset) -> table, least recently used first.
        self.tables: OrderedDict[int, object] = OrderedDict()
        # Slot -> bytes per table of that cache. No reference to the caches
        # themselves: a driver dropped without close() leaves its tables to
        # age out of the pool like any others.
        self._entry_bytes: dict[int, int] = {}
        self._slots = count(1)

    def register(self, entry_bytes: int) -> int:
        """A new cache's key base (its slot in the keys' high bits)."""
        with self.lock:
            slot = next(self._slots)
            self._entry_bytes[slot] = entry_bytes
        return slot << _SLOT_SHIFT

    def unregister(self, key_base: int) -> None:
        with self.lock:
            self._drop_all(key_base)
            self._entry_bytes.pop(key_base >> _SLOT_SHIFT, None)

    def lookup(self, key: int) -> object | None:
        """The table under `key`, now the most recently used; None if absent."""
        with self.lock:
            table = self.tables.get(key)
            if table is not None:
                self.tables.move_to_end(key)
            return table

    def add(self, key: int, table: object) -> None:
        with self.lock:
            if key in self.tables:
                self.tables.move_to_end(key)
            else:
                self.used += self._entry_bytes[key >> _SLOT_SHIFT]
            self.tables[key] = table
            self._shrink()

    def drop(self, key: int) -> None:
        with self.lock:
            self._drop(key)

    def drop_all(self, key_base: int) -> None:
        with self.lock:
            self._drop_all(key_base)

    def keys_of(self, key_base: int) -> list[int]:
        with self.lock:
            return self._keys_of(key_base)

    def resize(self, capacity: int) -> None:
        with self.lock:
            self.capacity = capacity
            self._shrink()

    # The lock is held by the callers of these.

    def _drop(self, key: int) -> None:
        if self.tables.pop(key, None) is not None:
            self.used -= self._entry_bytes[key >> _SLOT_SHIFT]

    def _drop_all(self, key_base: int) -> None:
        for key in self._keys_of(key_base):
            self._drop(key)

    def _keys_of(self, key_base: int) -> list[int]:
        return [k for k in self.tables if k & ~_OFFSET_MASK == key_base]

    def _shrink(self) -> None:
        """Evict least recently used tables until the pool fits."""
        tables = self.tables
        while self.used > self.capacity and len(tables) > 1:
            key, _ = tables.popitem(last=False)
            self.used -= self._entry_bytes[key >> _SLOT_SHIFT]


POOL = CachePool(DEFAULT_CACHE_SIZE - DEFAULT_CACHE_SIZE // MAP_SHARE)
_cache_size = DEFAULT_CACHE_SIZE


def set_cache_size(total: int) -> None:
    """The process's budget for metadata caches, in bytes (QEMU's
    `cache-size`): the table pool gets all but 1/MAP_SHARE, which bounds the
    block backends' cluster maps (created after this call)."""
    global _cache_size
    _cache_size = max(total, MIN_CACHE_SIZE)
    POOL.resize(_cache_size - _cache_size // MAP_SHARE)


def cache_size() -> int:
    return _cache_size


def map_budget() -> int:
    """Bytes a block backend's cluster maps may take."""
    return _cache_size // MAP_SHARE


class MetadataCache(Generic[T]):
    """One image's tables of one kind (each about `entry_bytes` in memory) in the pool."""

    def __init__(self, entry_bytes: int, pool: CachePool = POOL) -> None:
        self.entry_bytes = entry_bytes
        self.pool = pool
        self.key_base = pool.register(entry_bytes)

    def get(self, host_offset: int, load: Callable[[int], T]) -> T:
        """The table at host_offset, loaded with `load` on a miss."""
        key = self.key_base | host_offset
        table = self.pool.lookup(key)
        if table is None:
            table = load(host_offset)
            self.pool.add(key, table)
        return table  # type: ignore[return-value]

    def peek(self, host_offset: int) -> T | None:
        """The table at host_offset if the pool holds it (never loaded)."""
        return self.pool.lookup(self.key_base | host_offset)  # type: ignore[return-value]

    def put(self, host_offset: int, table: T) -> None:
        self.pool.add(self.key_base | host_offset, table)

    def invalidate(self, host_offset: int | None = None) -> None:
        """Forget one table, or all of this cache's."""
        if host_offset is None:
            self.pool.drop_all(self.key_base)
        else:
            self.pool.drop(self.key_base | host_offset)

    def close(self) -> None:
        """The image is closed: its tables leave the pool."""
        self.pool.unregister(self.key_base)

    def dirty_limit(self) -> int:
        """How many dirty tables of this size a writer should hold at most
        before writing them back (a share of the pool, at least one)."""
        return max(1, self.pool.capacity // DIRTY_SHARE // self.entry_bytes)

    def __len__(self) -> int:
        return len(self.pool.keys_of(self.key_base))
