"""The one bounded cache the serving path uses (kept blank-audio scores, kept verifier results)."""

from __future__ import annotations

import threading
from collections import OrderedDict


class LruCache:
    """A bounded, thread-safe map from tuples to values, least recently used out first, hits counted.

    Keys hold everything a value was computed from but the weights; whoever changes the weights
    under a cache clears it. Size 0 keeps nothing.
    """

    def __init__(self, size: int):
        self.size = size
        self.entries: OrderedDict[tuple, object] = OrderedDict()
        self.lock = threading.Lock()
        self.hits = 0

    def get(self, key: tuple):
        with self.lock:
            value = self.entries.get(key)
            if value is not None:
                self.entries.move_to_end(key)
                self.hits += 1
            return value

    def put(self, key: tuple, value) -> None:
        with self.lock:
            self.entries[key] = value
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
