"""Kept KV caches (live windows, conversations) in one LRU bounded in bytes.

A kept cache is what makes a question about now, or a follow-up in a conversation, prefill only itself; it is
also the biggest thing vidmem holds in RAM (about 12 KB per prompt token for the 0.5B model, 57 KB for the 7B, so a
3,000-token live window is 36 MB or 170 MB). Every stream and every conversation that ever asked would otherwise
keep one forever: here the least recently used go first once their bytes pass the limit (`--kv-cache-mb`).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Iterator

DEFAULT_BYTES = 2 << 30  # 2 GiB of kept caches by default


def cache_bytes(kept: Any) -> int:
    """Bytes a KeptPrefix's KV cache holds (its tensors' storage, reserved room included)."""
    cache = getattr(kept, "cache", kept)
    total = 0
    for layer in getattr(cache, "layers", ()) or ():
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None and hasattr(tensor, "untyped_storage"):
                total += tensor.untyped_storage().nbytes()
    return total


class KeptCaches:
    """A mapping of keys to kept caches, least recently used first out once `max_bytes` is passed.

    The newest entry always stays, even alone over the limit (a question must be answerable). Sizes are taken when
    an entry is put or touched again (`refresh`), since a live window grows in place.
    """

    def __init__(self, max_bytes: int = DEFAULT_BYTES, *, max_entries: int = 4096) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be zero or more, not {max_bytes}")
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._lock = threading.RLock()
        self.evicted = 0  # entries dropped to stay within the limits

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Any) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._items))

    def get(self, key: Any, default: Any = None) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return default
            self._items.move_to_end(key)
            return item[0]

    def __getitem__(self, key: Any) -> Any:
        with self._lock:
            if key not in self._items:
                raise KeyError(key)
            return self.get(key)

    def __setitem__(self, key: Any, kept: Any) -> None:
        with self._lock:
            self._items[key] = (kept, cache_bytes(kept))
            self._items.move_to_end(key)
            self._evict()

    def refresh(self, key: Any) -> None:
        """Measure an entry again (it grew in place) and enforce the limits."""
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items[key] = (item[0], cache_bytes(item[0]))
                self._items.move_to_end(key)
                self._evict()

    def pop(self, key: Any, default: Any = None) -> Any:
        with self._lock:
            item = self._items.pop(key, None)
            return default if item is None else item[0]

    def clear(self) -> None:
        """Drop every kept cache (the next question on each key prefills afresh)."""
        with self._lock:
            self._items.clear()

    def _evict(self) -> None:
        total = sum(size for _, size in self._items.values())
        while len(self._items) > 1 and (total > self.max_bytes or len(self._items) > self.max_entries):
            _, (_, size) = self._items.popitem(last=False)
            total -= size
            self.evicted += 1
