"""A small map whose entries expire, bounded in size: credential checks and
issued tokens are remembered for minutes, and every anonymous Docker Hub
token is new, so without pruning these would grow for ever."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Expiring(Generic[K, V]):
    def __init__(self, now: Callable[[], float], max_entries: int = 50_000) -> None:
        self._now = now
        self._max = max_entries
        self._entries: dict[K, tuple[V, float]] = {}

    def put(self, key: K, value: V, ttl: float) -> None:
        self._entries.pop(key, None)  # re-inserted last: dict order is age order
        self._entries[key] = (value, self._now() + ttl)
        if len(self._entries) > self._max:
            self._prune()

    def get(self, key: K) -> V | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if found[1] <= self._now():
            del self._entries[key]
            return None
        return found[0]

    def __len__(self) -> int:
        return len(self._entries)

    def _prune(self) -> None:
        now = self._now()
        self._entries = {k: v for k, v in self._entries.items() if v[1] > now}
        while len(self._entries) > self._max * 3 // 4:
            del self._entries[next(iter(self._entries))]  # the oldest
