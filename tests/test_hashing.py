"""Hashing fills off the reactor thread: the worker thread's digest is
hashlib's over the bytes in the order written, its backlog drains, and a
stopped worker fails the hash instead of answering a wrong one."""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mirrord.store.worker import BATCH, HashingStopped, HashWorker


class ThreadedReactor:
    """Just enough reactor for the worker: callFromThread queues calls that
    the test runs on its own thread, as the reactor loop would."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.Queue()
        self.main = threading.get_ident()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.calls.put((f, args))

    def run_until(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        while not done():
            f, args = self.calls.get(timeout=timeout)
            assert threading.get_ident() == self.main
            f(*args)


class ThreadHasherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ThreadedReactor()
        self.worker = HashWorker(self.reactor)
        self.worker.startService()
        self.addCleanup(lambda: self.worker.running and self.worker.stopService())

    def test_digest_of_many_pieces_in_order(self) -> None:
        """Small and large pieces, several batches: the digest is of the bytes in order."""
        pieces = [os.urandom(size) for size in (1, 100, 2047, 2048, 16384, 32768) * 40]
        pieces += [os.urandom(BATCH + 7), os.urandom(3)]
        hasher = self.worker.hasher("sha256")
        for piece in pieces:
            hasher.update(piece)
        self.assertGreater(hasher.backlog, 0)
        results: list[str] = []
        hasher.hexdigest().addCallback(results.append)
        self.reactor.run_until(lambda: bool(results))
        self.assertEqual(results, [hashlib.sha256(b"".join(pieces)).hexdigest()])
        self.assertEqual(hasher.backlog, 0)

    def test_two_fills_interleaved_keep_their_own_digests(self) -> None:
        a, b = self.worker.hasher("sha256"), self.worker.hasher("sha256")
        data_a, data_b = os.urandom(3 * BATCH), os.urandom(2 * BATCH + 1)
        for i in range(0, len(data_a), 65536):
            a.update(data_a[i : i + 65536])
            b.update(data_b[i : i + 65536])
        results: dict[str, str] = {}
        a.hexdigest().addCallback(lambda hexdigest: results.__setitem__("a", hexdigest))
        b.hexdigest().addCallback(lambda hexdigest: results.__setitem__("b", hexdigest))
        self.reactor.run_until(lambda: len(results) == 2)
        self.assertEqual(results["a"], hashlib.sha256(data_a).hexdigest())
        self.assertEqual(results["b"], hashlib.sha256(data_b).hexdigest())

    def test_caught_up_fires_when_the_backlog_is_hashed(self) -> None:
        hasher = self.worker.hasher("sha256")
        for _ in range(8):
            hasher.update(os.urandom(BATCH // 2))
        caught: list[object] = []
        hasher.caught_up().addCallback(caught.append)
        self.reactor.run_until(lambda: bool(caught))
        self.assertEqual(hasher.backlog, 0)

    def test_stopped_worker_fails_the_hash(self) -> None:
        """At shutdown a fill's hash fails (the fill is not published), never a wrong digest."""
        hasher = self.worker.hasher("sha256")
        hasher.update(b"x" * 4096)
        self.worker.stopService()
        hasher.update(b"y" * BATCH)
        self.failureResultOf(hasher.hexdigest(), HashingStopped)
