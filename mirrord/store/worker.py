"""A fill's disk and hash work, off the reactor thread.

A cold blob costs the reactor its TLS work; writing it to the page cache
and hashing it would cost as much again (perf: the ``write`` system call
was about a quarter of the reactor on a cold stream). Twisted has no
non-blocking file I/O, so one worker thread does both (as Synapse's media
repository hands disk work to threads): hashlib and ``os.write`` release
the GIL, so the worker uses the second core while the reactor encrypts
for the client.

One thread, first in first out, serves every fill. For each fill it
writes the bytes to the fill's temporary file, hashes them, starts their
writeback (``sync_file_range``) and finally, once verified, fsyncs and
links the file into place; a fill's work runs in the order it was given.
The reactor learns that bytes are in the file only from the worker's
callback, sent after the write and before the hash, so readers following
the file never read past what is there and do not wait for the hash.

Memory is bounded across fills, not per fill: ``HashWorker.backlog``
counts the bytes handed to the thread and not yet written and hashed, for
every fill together. Above ``BACKLOG`` a fill pauses its upstream until
the backlog drains to half of it. Chunks are batched to about 1 MiB per
hand-off while the thread holds some of the fill (TLS upstreams deliver
16-32 KiB pieces), and handed over at once otherwise, so readers are not
kept waiting.

``InlineHasher`` does the same work synchronously on the caller's thread:
for tests on a ``task.Clock``, where everything is deterministic.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mirrord.store.disk import BlobStore, Entry, Meta, TempBlob

T = TypeVar("T")

BATCH = 1 << 20
# Bytes handed to the worker and not yet written and hashed, for all fills
# together, above which filling upstreams pause. An upstream faster than
# the disk keeps it full, so the daemon's peak RSS grows with it: a slow
# client of a 256 MiB blob (tests/e2e, limit 100 MiB) peaked at 69-74 MiB
# with 4 MiB, 74-76 with 8, 84-91 with 16, 100-104 with 32 (67-70 before
# the writes moved here).
BACKLOG = 8 << 20


class HashingStopped(Exception):
    """The worker stopped (the daemon is shutting down) before the fill was done."""

    def __init__(self) -> None:
        super().__init__("the disk worker stopped")


class Hasher(Protocol):
    """One fill's disk work: its bytes written to its temporary file and
    hashed, in the order given; then whatever ``run`` is given, after them."""

    def begin(
        self,
        temp: TempBlob,
        written: Callable[[int], None],
        failed: Callable[[Exception], None],
    ) -> None:
        """Write to ``temp``. ``written(n)``: n more bytes are in the file.
        ``failed(error)``, at most once: a write failed (or the worker
        stopped); nothing more is written."""
        ...

    def update(self, data: bytes) -> None:
        """Write and hash ``data`` after everything given before."""
        ...

    def congested(self) -> bool:
        """Whether the worker holds too many bytes, across every fill."""
        ...

    def drained(self) -> Deferred[None]:
        """Fires once the worker's backlog is low again."""
        ...

    def hexdigest(self) -> Deferred[str]:
        """The digest of every byte given, once they are all in the file."""
        ...

    def run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """``f(*args)`` on the worker, after this fill's writes."""
        ...

    def discard(self) -> None:
        """Write nothing more; close and remove the temporary file."""
        ...


class InlineHasher:
    """Does a fill's disk work on the caller's thread: for tests on a Clock."""

    def __init__(self, algorithm: str) -> None:
        self._hash = hashlib.new(algorithm)
        self._temp: TempBlob | None = None
        self._written: Callable[[int], None] = lambda n: None
        self._failed: Callable[[Exception], None] = lambda e: None
        self._broken = False

    def begin(
        self,
        temp: TempBlob,
        written: Callable[[int], None],
        failed: Callable[[Exception], None],
    ) -> None:
        self._temp, self._written, self._failed = temp, written, failed

    def update(self, data: bytes) -> None:
        if self._broken or self._temp is None:
            return
        try:
            self._temp.write(data)
        except OSError as e:
            self._broken = True
            self._failed(e)
            return
        self._hash.update(data)
        self._written(len(data))

    def congested(self) -> bool:
        return False

    def drained(self) -> Deferred[None]:
        return succeed(None)

    def hexdigest(self) -> Deferred[str]:
        return succeed(self._hash.hexdigest())

    def run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return maybeDeferred(f, *args)

    def discard(self) -> None:
        self._broken = True
        if self._temp is not None:
            self._temp.discard()


class HashWorker(Service):
    """The thread that writes and hashes fills. The daemon stops it only
    after its transfers drained; a fill still running then fails,
    unpublished."""

    name = "disk worker"

    def __init__(self, reactor: Any, limit: int = BACKLOG) -> None:
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="mirrord-disk")
        self.limit = limit
        self.backlog = 0
        self._waiting: list[Deferred[None]] = []

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()
        # Paused fills resume, and fail on their next write.
        self._wake()

    def hasher(self, algorithm: str) -> ThreadHasher:
        return ThreadHasher(self, algorithm)

    @property
    def stopped(self) -> bool:
        return bool(self.pool.joined)

    def congested(self) -> bool:
        return self.backlog > self.limit

    def drained(self) -> Deferred[None]:
        if self.backlog <= self.limit // 2 or self.stopped:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def queued(self, size: int) -> None:
        self.backlog += size

    def done(self, size: int) -> None:
        """``size`` queued bytes were written, skipped or dropped."""
        self.backlog -= size
        if self.backlog <= self.limit // 2:
            self._wake()

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def call(self, f: Callable[..., Any], *args: Any) -> bool:
        """Queue ``f(*args)`` on the thread; False if the worker stopped."""
        if self.stopped:
            return False
        self.pool.callInThread(f, *args)
        return True

    def run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        if self.stopped:
            return fail(HashingStopped())
        return deferToThreadPool(self.reactor, self.pool, f, *args)


class ThreadHasher:
    """A ``Hasher`` whose work runs in a ``HashWorker``'s thread.

    The thread touches the temporary file only through work queued here,
    and closes it only in queued work too: a descriptor closed on the
    reactor while a write is queued could be reused by a socket, and the
    write would land there."""

    def __init__(self, worker: HashWorker, algorithm: str) -> None:
        self._worker = worker
        self._reactor = worker.reactor
        self._hash = hashlib.new(algorithm)
        self._temp: TempBlob | None = None
        self._written: Callable[[int], None] = lambda n: None
        self._failed: Callable[[Exception], None] = lambda e: None
        self._batch: list[bytes] = []
        self._batched = 0
        self._in_flight = 0
        # Set on the reactor, read by the thread: stop writing this fill.
        self._cancelled = False
        # Set by the thread: a write failed, so nothing more is written.
        self._error: OSError | None = None
        self._reported = False

    def begin(
        self,
        temp: TempBlob,
        written: Callable[[int], None],
        failed: Callable[[Exception], None],
    ) -> None:
        self._temp, self._written, self._failed = temp, written, failed

    def update(self, data: bytes) -> None:
        if self._cancelled or self._reported:
            return
        self._batch.append(data)
        self._batched += len(data)
        self._worker.queued(len(data))
        if self._batched >= BATCH or self._in_flight == 0:
            self._flush()

    def congested(self) -> bool:
        return self._worker.congested()

    def drained(self) -> Deferred[None]:
        return self._worker.drained()

    def hexdigest(self) -> Deferred[str]:
        self._flush()
        return self._worker.run(self._digest)

    def run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        self._flush()
        return self._worker.run(f, *args)

    def discard(self) -> None:
        self._cancelled = True
        self._worker.done(self._batched)
        self._batch, self._batched = [], 0
        temp = self._temp
        if temp is None:
            return
        if not self._worker.call(temp.discard):
            # The thread is gone (joined): nothing else can touch the file.
            temp.discard()

    def _flush(self) -> None:
        if not self._batch:
            return
        batch, size = self._batch, self._batched
        self._batch, self._batched = [], 0
        if self._worker.call(self._write, batch, size):
            self._in_flight += size
        else:
            self._worker.done(size)
            self._report(HashingStopped())

    def _write(self, batch: list[bytes], size: int) -> None:
        """In the worker thread: write the batch and tell the reactor
        (readers may send those bytes now), then hash it and tell the
        reactor its memory is free."""
        error = None
        written = False
        if not self._cancelled and self._error is None and self._temp is not None:
            try:
                for data in batch:
                    self._temp.write(data)
                written = True
            except OSError as e:
                self._error = error = e
        self._reactor.callFromThread(self._wrote, size, written, error)
        if written:
            for data in batch:
                self._hash.update(data)
        self._reactor.callFromThread(self._hashed, size)

    def _wrote(self, size: int, written: bool, error: OSError | None) -> None:
        """Back on the reactor: ``size`` bytes are in the file (or not)."""
        if error is not None:
            self._report(error)
        elif written and not self._cancelled:
            self._written(size)

    def _hashed(self, size: int) -> None:
        """Back on the reactor: ``size`` bytes left the worker's queue."""
        self._in_flight -= size
        self._worker.done(size)
        if self._in_flight == 0 and not self._cancelled:
            self._flush()

    def _report(self, error: Exception) -> None:
        if not self._reported and not self._cancelled:
            self._reported = True
            self._failed(error)

    def _digest(self) -> str:
        """In the worker thread, after this fill's writes."""
        if self._error is not None:
            raise self._error
        return self._hash.hexdigest()


def put_bytes(
    store: BlobStore, hasher: Hasher, digest: str, data: bytes, meta: Meta
) -> Deferred[Entry]:
    """``store.put_bytes`` with the disk work (write, fsync, link) on the
    disk worker and the index updated on the reactor: for manifests, which
    are small but still cost an fsync each."""
    when = store.now()
    written = hasher.run(store.write_bytes, digest, data, json.dumps(asdict(meta)).encode(), when)
    return written.addCallback(lambda _: store.add(digest, len(data), meta, when))
