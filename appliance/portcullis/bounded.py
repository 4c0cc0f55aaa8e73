"""A table with a size cap, for state keyed by what clients send."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class BoundedTable(OrderedDict):
    """A dict of at most `capacity` keys. Storing a key or getting it with get() makes it
    the newest; past the capacity the least recently used goes, and `evictions` counts
    how many went that way."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.evictions = 0

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)
            self.evictions += 1

    def get(self, key, default=None):
        try:
            value = self[key]
        except KeyError:
            return default
        self.move_to_end(key)
        return value

    def drop_where(self, expired: Callable[[object], bool]) -> None:
        """Forget every entry whose value is expired."""
        for key in [key for key, value in self.items() if expired(value)]:
            del self[key]

    def take_evictions(self) -> int:
        """Evictions since the last call (for a counter metric)."""
        count, self.evictions = self.evictions, 0
        return count
