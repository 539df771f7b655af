"""An explicit metadata cache: decoded L2 tables and refcount blocks by host offset.

Write-through: callers change an entry in the cached table and write the
bytes themselves, so the cache never holds dirty state and a crash loses
nothing that was issued. Jobs that rewrite tables behind a driver call
`invalidate`. Never an `lru_cache` on methods.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class MetadataCache(Generic[T]):
    """Least-recently-used map from a table's host offset to its decoded form."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._tables: OrderedDict[int, T] = OrderedDict()

    def get(self, host_offset: int, load: Callable[[int], T]) -> T:
        """The table at host_offset, loaded with `load` on a miss."""
        table = self._tables.get(host_offset)
        if table is None:
            table = load(host_offset)
            self.put(host_offset, table)
        else:
            self._tables.move_to_end(host_offset)
        return table

    def put(self, host_offset: int, table: T) -> None:
        self._tables[host_offset] = table
        self._tables.move_to_end(host_offset)
        while len(self._tables) > self.capacity:
            self._tables.popitem(last=False)

    def invalidate(self, host_offset: int | None = None) -> None:
        """Forget one table, or all of them."""
        if host_offset is None:
            self._tables.clear()
        else:
            self._tables.pop(host_offset, None)

    def __len__(self) -> int:
        return len(self._tables)
