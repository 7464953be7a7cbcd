"""Hashing fills off the reactor thread.

A cold blob costs the reactor its TLS work plus sha256 over every byte.
hashlib releases the GIL for updates over 2 KiB, so one worker thread
hashes on the second core while the reactor encrypts for the client
(measured in bench/: about 1.4x the cold single-stream rate). This is CPU
work, not I/O: files and sockets stay on the reactor.

One thread, first in first out, serves every fill: a fill's updates are
hashed in the order they were written, and asking for the result (or for
``caught_up``) queues behind them. Chunks are batched to about 1 MiB per
hand-off, since TLS upstreams deliver 16-32 KiB pieces. ``backlog`` says
how many bytes wait, so a fill can pause its upstream rather than queue
memory without bound.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

BATCH = 1 << 20


class HashingStopped(Exception):
    """The worker stopped (the daemon is shutting down) before the hash was done."""


class Hasher(Protocol):
    """sha256 (or another hashlib algorithm) over bytes given in order."""

    backlog: int

    def update(self, data: bytes) -> None: ...

    def hexdigest(self) -> Deferred[str]:
        """The digest of every byte given so far."""
        ...

    def caught_up(self) -> Deferred[None]:
        """Fires once the bytes given so far are hashed."""
        ...


class InlineHasher:
    """Hashes on the caller's thread: small bodies, and tests on a Clock."""

    backlog = 0

    def __init__(self, algorithm: str) -> None:
        self._hash = hashlib.new(algorithm)

    def update(self, data: bytes) -> None:
        self._hash.update(data)

    def hexdigest(self) -> Deferred[str]:
        return succeed(self._hash.hexdigest())

    def caught_up(self) -> Deferred[None]:
        return succeed(None)


class HashWorker(Service):
    """The thread that hashes fills. The daemon stops it only after its
    transfers drained; a fill still running then fails, unpublished."""

    name = "hash worker"

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="mirrord-hash")

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()

    def hasher(self, algorithm: str) -> ThreadHasher:
        return ThreadHasher(self.reactor, self.pool, algorithm)


class ThreadHasher:
    """A ``Hasher`` whose work runs in a ``HashWorker``'s thread."""

    def __init__(self, reactor: Any, pool: ThreadPool, algorithm: str) -> None:
        self._reactor = reactor
        self._pool = pool
        self._hash = hashlib.new(algorithm)
        self._batch: list[bytes] = []
        self._batched = 0
        self.backlog = 0

    def update(self, data: bytes) -> None:
        self._batch.append(data)
        self._batched += len(data)
        self.backlog += len(data)
        if self._batched >= BATCH:
            self._flush()

    def hexdigest(self) -> Deferred[str]:
        self._flush()
        if self._pool.joined:
            return fail(HashingStopped())
        return deferToThreadPool(self._reactor, self._pool, self._hash.hexdigest)

    def caught_up(self) -> Deferred[None]:
        self._flush()
        if self._pool.joined:
            return fail(HashingStopped())
        return deferToThreadPool(self._reactor, self._pool, lambda: None)

    def _flush(self) -> None:
        if not self._batch:
            return
        # A stopped pool drops work silently; hexdigest then fails instead.
        batch, size = self._batch, self._batched
        self._batch, self._batched = [], 0
        self._pool.callInThread(self._hash_batch, batch, size)

    def _hash_batch(self, batch: list[bytes], size: int) -> None:
        """In the worker thread."""
        for data in batch:
            self._hash.update(data)
        self._reactor.callFromThread(self._hashed, size)

    def _hashed(self, size: int) -> None:
        self.backlog -= size
