"""Small manifests kept in memory by digest, so a cache hit reads no file.

A manifest is immutable under its digest, so the bytes stay right as long
as the store still indexes the very ``Entry`` they were read with: an entry
evicted, forgotten or replaced (new metadata) makes them unreachable here.
Who may read them is not decided here: the caller applies the privacy
check to the entry's metadata on every hit, as on a read from disk. The
memo is an LRU bounded in bytes and in the size of one manifest.
"""

from __future__ import annotations

from collections import OrderedDict

from mirrord.store.disk import Entry

MAX_BYTES = 8 << 20
MAX_ITEM = 256 << 10


class ManifestMemo:
    """Digest -> (the store's entry, its bytes), least recently used first."""

    def __init__(self, max_bytes: int = MAX_BYTES, max_item: int = MAX_ITEM) -> None:
        self.max_bytes = max_bytes
        self.max_item = max_item
        self.size = 0
        self._items: OrderedDict[str, tuple[Entry, bytes]] = OrderedDict()

    def get(self, digest: str, entry: Entry) -> bytes | None:
        """The bytes read for ``entry``, or ``None`` (not held, or held for
        an entry the store no longer has)."""
        item = self._items.get(digest)
        if item is None:
            return None
        if item[0] is not entry:
            self._drop(digest)
            return None
        self._items.move_to_end(digest)
        return item[1]

    def put(self, digest: str, entry: Entry, body: bytes) -> None:
        if len(body) > self.max_item:
            return
        if digest in self._items:
            self._drop(digest)
        self._items[digest] = (entry, body)
        self.size += len(body)
        while self.size > self.max_bytes:
            self._drop(next(iter(self._items)))

    def _drop(self, digest: str) -> None:
        self.size -= len(self._items.pop(digest)[1])

    def __len__(self) -> int:
        return len(self._items)
