"""Per-client counts shared by the worker processes of one host, so that
``max_connections_per_client``, ``max_requests_per_client`` and the failed
login limit hold per host, not per worker.

A fixed-size table in a file under the workers' ``shared_dir``, mapped into
every worker (``mmap``, ``MAP_SHARED``): a request costs a few memory reads
and writes under an ``fcntl`` record lock on the handful of slots it looks
at, never a round trip to another process. The lock is held for the
microseconds of that read-modify-write; the kernel drops it if its holder
dies.

Each slot is one client key (its hash, salted by a random salt chosen when
the file is made, so nobody can aim addresses at one slot's neighbours):
the failed-login record (count and when it ends), then for each worker its
own connections, requests in flight and distinct credentials being checked.
Counting per worker is what keeps a dead worker's counts from leaking:
``clear_worker`` zeroes its columns, and a worker clears its own when it
opens the table (a restarted worker has the dead one's index).

A key looks at ``probes`` slots from its hash; an unknown key takes the
first one that holds nothing live. When all of them are live the table is
full for that key: ``add`` answers False and the caller counts that client
in its own memory (``SharedCounter``), so the limit still holds per worker,
as it did before workers, never not at all.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import secrets
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fcntl import LOCK_EX, LOCK_UN, lockf
from pathlib import Path

MAGIC = int.from_bytes(b"mrdclnt1", "little")
HEADER_WORDS = 8  # magic, slots, workers, probes, salt, spare
SLOTS = 16384
PROBES = 16
FILE_NAME = "clients"
# Client keys whose hashes a worker remembers (then it forgets them all).
_HASHES_KEPT = 4096

# Columns of a worker's part of a slot.
CONNECTIONS, REQUESTS, CHECKING = 0, 1, 2
_PER_WORKER = 3
# A slot: hash, failure count, failure end (a double), then the workers' columns.
_HASH, _FAILURES, _UNTIL, _WORKERS = 0, 1, 2, 3


class ClientTable:
    """The shared table as seen by worker ``index`` (1..``workers``).
    Used from the reactor thread only: record locks keep other processes
    out, not other threads of this one."""

    def __init__(
        self,
        path: Path,
        workers: int,
        index: int,
        now: Callable[[], float],
        slots: int = SLOTS,
        probes: int = PROBES,
    ) -> None:
        if not 1 <= index <= workers or probes > slots:
            raise ValueError(f"worker {index} of {workers}, {probes} probes of {slots} slots")
        self.index = index
        self._now = now
        self._width = _WORKERS + _PER_WORKER * workers
        self._slots = slots
        self._probes = probes
        # Where a window of ``probes`` slots may start (no window wraps).
        self._windows = slots - probes + 1
        self._window_bytes = 8 * probes * self._width
        # This worker's columns in a slot.
        self._mine = _WORKERS + _PER_WORKER * (index - 1)
        self._blank = memoryview(bytes(8 * self._width)).cast("Q")
        self._hashes: dict[str, int] = {}
        self._size = 8 * (HEADER_WORDS + slots * self._width)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            with self._locked(0, 0):
                header = self._header(workers)
                existing = os.pread(self._fd, 8 * 5, 0)
                if os.fstat(self._fd).st_size == 0:
                    os.ftruncate(self._fd, self._size)
                    os.pwrite(self._fd, header, 0)
                elif existing[:32] != header[:32] or os.fstat(self._fd).st_size != self._size:
                    raise ValueError(f"{path} was made for another number of workers or slots")
                self._map = mmap.mmap(self._fd, self._size)
                self._q = memoryview(self._map).cast("Q")
                self._d = memoryview(self._map).cast("d")
                self._salt = self._q[4].to_bytes(8, "little")
                self._clear(index)
        except BaseException:
            os.close(self._fd)
            raise

    def _header(self, workers: int) -> bytes:
        words = [MAGIC, self._slots, workers, self._probes, secrets.randbits(64), 0, 0, 0]
        return b"".join(w.to_bytes(8, "little") for w in words)

    def close(self) -> None:
        self._q.release()
        self._d.release()
        self._map.close()
        os.close(self._fd)

    @contextmanager
    def _locked(self, start: int, length: int) -> Iterator[None]:
        # A record lock on the bytes about to be read and written; length 0
        # is the whole file. Released by the kernel if this process dies.
        fcntl.lockf(self._fd, fcntl.LOCK_EX, length, start)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, length, start)

    def _hash(self, key: str) -> int:
        hashed = self._hashes.get(key)
        if hashed is None:
            if len(self._hashes) >= _HASHES_KEPT:
                self._hashes.clear()
            digest = hashlib.blake2b(key.encode(), digest_size=8, key=self._salt).digest()
            # 0 marks a slot never used.
            hashed = self._hashes[key] = int.from_bytes(digest, "little") or 1
        return hashed

    def _window(self, key: str) -> tuple[int, int, int]:
        """The key's hash, its first slot's word offset and the window's
        length in bytes; lock that range with ``_lock`` before use."""
        hashed = self._hash(key)
        start = HEADER_WORDS + (hashed % self._windows) * self._width
        return hashed, start, self._window_bytes

    def _find(self, hashed: int, start: int, claim: bool) -> int | None:
        """The word offset of the key's slot; with ``claim``, a free one
        taken for it when it has none. None: not there (or full)."""
        q, width = self._q, self._width
        end = start + self._probes * width
        hashes = q[start:end:width].tolist()
        if hashed in hashes:
            return start + hashes.index(hashed) * width
        if not claim:
            return None
        for offset in range(start, end, width):
            if self._idle(offset):
                q[offset : offset + width] = self._blank
                q[offset + _HASH] = hashed
                return offset
        return None

    def _idle(self, offset: int) -> bool:
        q = self._q
        if q[offset + _HASH] == 0:
            return True
        if q[offset + _FAILURES] and self._d[offset + _UNTIL] > self._now():
            return False
        return not any(q[offset + _WORKERS : offset + self._width])

    def add(self, key: str, column: int, delta: int) -> bool:
        """Count ``delta`` more in this worker's ``column`` for ``key``.
        False when the table has no slot for it (count it elsewhere)."""
        hashed, start, length = self._window(key)
        lockf(self._fd, LOCK_EX, length, 8 * start)
        try:
            offset = self._find(hashed, start, claim=delta > 0)
            if offset is None:
                return False
            at = offset + self._mine + column
            value = self._q[at] + delta
            if value < 0:
                return False  # not counted here: the caller counted it elsewhere
            self._q[at] = value
            return True
        finally:
            lockf(self._fd, LOCK_UN, length, 8 * start)

    def total(self, key: str, column: int) -> int:
        """``column`` for ``key`` summed over all workers."""
        hashed, start, length = self._window(key)
        lockf(self._fd, LOCK_EX, length, 8 * start)
        try:
            offset = self._find(hashed, start, claim=False)
            if offset is None:
                return 0
            first = offset + _WORKERS + column
            return sum(self._q[first : offset + self._width : _PER_WORKER])
        finally:
            lockf(self._fd, LOCK_UN, length, 8 * start)

    def failed(self, key: str, limit: int, window: float) -> bool:
        """One more failed login for ``key``: the record lasts ``window``
        seconds from its first failure, and from its last once it reaches
        ``limit``. False when the table has no slot for it."""
        now = self._now()
        hashed, start, length = self._window(key)
        with self._locked(8 * start, length):
            offset = self._find(hashed, start, claim=True)
            if offset is None:
                return False
            q, d = self._q, self._d
            if not q[offset + _FAILURES] or d[offset + _UNTIL] <= now:
                q[offset + _FAILURES] = 0
                d[offset + _UNTIL] = now + window
            q[offset + _FAILURES] += 1
            if q[offset + _FAILURES] >= limit:
                d[offset + _UNTIL] = now + window
            return True

    def failures(self, key: str) -> tuple[int, float]:
        """The failed logins counted for ``key`` and when its record ends;
        (0, 0.0) when it has none or it has ended."""
        hashed, start, length = self._window(key)
        with self._locked(8 * start, length):
            offset = self._find(hashed, start, claim=False)
            if offset is None:
                return 0, 0.0
            count, until = self._q[offset + _FAILURES], self._d[offset + _UNTIL]
            return (count, until) if count and until > self._now() else (0, 0.0)

    def failing(self) -> int:
        """How many keys have a failed-login record (a whole-table scan)."""
        now, q, d = self._now(), self._q, self._d
        with self._locked(0, 0):
            return sum(
                1
                for offset in range(HEADER_WORDS, len(q), self._width)
                if q[offset + _FAILURES] and d[offset + _UNTIL] > now
            )

    def _clear(self, index: int) -> None:
        """Zero worker ``index``'s columns (under the whole-file lock).
        Only where something is counted: a page never written stays a
        hole in the file, not a page to write back."""
        q, first = self._q, _WORKERS + _PER_WORKER * (index - 1)
        zeros = memoryview(bytes(8 * _PER_WORKER)).cast("Q")
        for offset in range(HEADER_WORDS + first, len(q), self._width):
            if any(q[offset : offset + _PER_WORKER]):
                q[offset : offset + _PER_WORKER] = zeros


def table_path(shared_dir: Path) -> Path:
    return shared_dir / FILE_NAME


def clear_worker(shared_dir: Path, index: int) -> None:
    """For the supervisor, when worker ``index`` died: its connections,
    requests and checks no longer count against any client. (The worker
    started in its place clears them too when it opens the table; this
    covers the time in between.) Nothing to do if no worker made the table
    yet."""
    path = table_path(shared_dir)
    try:
        with path.open("rb") as file:
            header = file.read(8 * 4)
    except FileNotFoundError:
        return
    if len(header) < 8 * 4:
        return
    magic, slots, workers, probes = (
        int.from_bytes(header[i : i + 8], "little") for i in range(0, 32, 8)
    )
    if magic != MAGIC:
        return
    # Opening as the dead worker clears its columns.
    ClientTable(path, workers, index, lambda: 0.0, slots, probes).close()


class SharedCounter:
    """A per-client count over all workers: in the table, or, for a client
    the table has no room for, in this worker's memory."""

    def __init__(self, table: ClientTable, column: int) -> None:
        self._table = table
        self._column = column
        self._overflow: Counter[str] = Counter()

    def add(self, key: str) -> None:
        if not self._table.add(key, self._column, 1):
            self._overflow[key] += 1

    def remove(self, key: str) -> None:
        if self._overflow.get(key):
            self._overflow[key] -= 1
            if self._overflow[key] <= 0:
                del self._overflow[key]
            return
        self._table.add(key, self._column, -1)

    def __getitem__(self, key: str) -> int:
        return self._table.total(key, self._column) + self._overflow.get(key, 0)
