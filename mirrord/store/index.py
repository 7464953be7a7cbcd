"""The cache's index shared by every process using the cache directory: a
SQLite database in WAL mode (``index.sqlite`` beside ``blobs/``).

Each process keeps its own index in memory for hits (no SQLite on a hit);
this one is what they agree on: every published blob with its size, its
last access (batched from each process's hits) and its repository (for
pins), so the size limit counts every process's blobs and eviction picks
the least recently used across them. An eviction runs in one ``BEGIN
IMMEDIATE`` transaction, so two processes never evict at once on stale
totals; every lock wait is bounded by ``busy_timeout``.

Blocking: only the disk worker thread (``mirrord.store.worker``) calls it,
and the startup scan before the reactor runs.
"""

from __future__ import annotations

import fnmatch
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path

NAME = "index.sqlite"
# Milliseconds a process waits for another's transaction (an eviction).
BUSY_TIMEOUT_MS = 10_000


class SharedIndex:
    """Published blobs of a cache directory, across processes."""

    def __init__(self, root: Path) -> None:
        self.path = root / NAME
        self._db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS blobs (digest TEXT PRIMARY KEY, size INTEGER NOT NULL,"
            " last_access REAL NOT NULL, repository TEXT NOT NULL DEFAULT '')"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS by_access ON blobs (last_access)")

    def close(self) -> None:
        self._db.close()

    def put(self, digest: str, size: int, when: float, repository: str) -> None:
        """A blob published (or published again)."""
        self._db.execute(
            "INSERT INTO blobs VALUES (?, ?, ?, ?) ON CONFLICT (digest) DO UPDATE SET"
            " size = excluded.size, last_access = max(last_access, excluded.last_access),"
            " repository = excluded.repository",
            (digest, size, when, repository),
        )

    def ensure(self, digest: str, size: int, when: float, repository: str) -> None:
        """A blob found on disk: counted, if its publisher died before
        recording it (kept as it is when already there)."""
        self._db.execute(
            "INSERT OR IGNORE INTO blobs VALUES (?, ?, ?, ?)", (digest, size, when, repository)
        )

    def remove(self, digest: str) -> None:
        self._db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))

    def touch(self, accesses: dict[str, float]) -> None:
        """Hits since the last batch: digest -> when."""
        if accesses:
            self._db.executemany(
                "UPDATE blobs SET last_access = max(last_access, ?) WHERE digest = ?",
                [(when, digest) for digest, when in accesses.items()],
            )

    def total(self) -> int:
        return self._db.execute("SELECT coalesce(sum(size), 0) FROM blobs").fetchone()[0]

    def figures(self) -> tuple[int, int]:
        """(bytes, blobs) in the cache, every process's."""
        size, count = self._db.execute(
            "SELECT coalesce(sum(size), 0), count(*) FROM blobs"
        ).fetchone()
        return size, count

    def digests(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT digest FROM blobs")}

    def reconcile(
        self, found: Iterable[tuple[str, int, float, str]], exists: Callable[[str], bool]
    ) -> None:
        """After a scan of the disk: add what is there and missing here;
        drop rows whose files are gone. The files are looked at before the
        transaction (a stat of every row under the write lock could hold it
        past other processes' busy timeout), and only the missing ones again
        inside it: a blob another process published meanwhile stays."""
        rows = [tuple(row) for row in found]
        missing = [digest for digest in self.digests() if not exists(digest)]
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany("INSERT OR IGNORE INTO blobs VALUES (?, ?, ?, ?)", rows)
            for digest in missing:
                if not exists(digest):
                    self.remove(digest)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def evict(
        self,
        max_size: int,
        high: float,
        low: float,
        keep: Callable[[str, str], bool],
        remove_files: Callable[[str], None],
        accesses: dict[str, float] | None = None,
    ) -> tuple[list[str], int]:
        """Above ``high x max_size`` (every process's blobs), remove least
        recently used blobs until under ``low x max_size``, except those
        ``keep(digest, repository)`` says stay. Returns (removed, total)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self.touch(accesses or {})
            total = self.total()
            removed: list[str] = []
            if total > max_size * high:
                target = max_size * low
                rows = self._db.execute(
                    "SELECT digest, size, repository FROM blobs ORDER BY last_access"
                ).fetchall()
                for digest, size, repository in rows:
                    if total <= target:
                        break
                    if keep(digest, repository):
                        continue
                    remove_files(digest)
                    self.remove(digest)
                    total -= size
                    removed.append(digest)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return removed, total


def pinned_repository(patterns: Iterable[str]) -> Callable[[str], bool]:
    """Whether a repository is pinned by a pattern like ``library/*``."""
    names = [p for p in patterns if ":" not in p]
    return lambda repository: any(fnmatch.fnmatchcase(repository, p) for p in names)
