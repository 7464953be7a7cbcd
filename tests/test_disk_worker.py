"""Fills with their disk work on the worker thread: one memory bound for
every fill, readers limited to the bytes in the file, publication off the
reactor, and a disk that is full or out of descriptors failing the cache
cleanly, never the bytes."""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import tempfile
import threading
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone

from mirrord.config import parse_size
from mirrord.store.disk import (
    BlobStore,
    DigestMismatch,
    Meta,
    StoreUnavailable,
    TempBlob,
)
from mirrord.store.fill import Fill, FillFailed, StoreFailed
from mirrord.store.worker import BATCH, HashWorker, InlineHasher, put_bytes
from tests.support.threads import ThreadedReactor

MIB = 1 << 20


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class CommitThreads(BlobStore):
    """A store that notes the thread each publication ran on."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.commit_threads: list[int] = []

    def commit(self, temp: TempBlob, digest: str, meta: bytes, when: float) -> None:
        self.commit_threads.append(threading.get_ident())
        super().commit(temp, digest, meta, when)


class BrokenCommit(BlobStore):
    """A store whose disk is full when a verified blob is published."""

    def commit(self, temp: TempBlob, digest: str, meta: bytes, when: float) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def failures(fill: Fill) -> list[Failure]:
    """How ``fill`` failed, as whoever started it (the fill swallows its
    own failure after telling them)."""
    caught: list[Failure] = []
    fill.done.addErrback(caught.append)
    return caught


class LogCatcher:
    def __init__(self, test: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_level") in (LogLevel.error, LogLevel.warn)]


class ThreadedFillTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ThreadedReactor()
        self.worker = HashWorker(self.reactor, limit=4 * MIB)
        self.worker.startService()
        self.addCleanup(lambda: self.worker.running and self.worker.stopService())
        self.root = Path(tempfile.mkdtemp())
        self.store = CommitThreads(self.root, parse_size("1GiB"))
        self.clock = Clock()

    def fill(self, data: bytes) -> tuple[Fill, StringTransport]:
        fill = Fill(self.store, self.worker.hasher("sha256"), _digest(data), Meta(), len(data),
                    self.clock, 30, 30)  # fmt: skip
        transport = StringTransport()
        fill.makeConnection(transport)
        return fill, transport

    def drain_worker(self) -> None:
        """Everything queued on the worker ran and the reactor heard of it."""
        ran: list[object] = []
        self.worker.run(lambda: None).addCallback(ran.append)
        self.reactor.run_until(lambda: bool(ran))

    def test_two_fills_share_one_memory_bound(self) -> None:
        """Two fills together never queue much past one bound; both upstreams pause and resume."""
        chunk = MIB
        blobs = [os.urandom(12 * MIB), os.urandom(12 * MIB + 5)]
        fills = [self.fill(data) for data in blobs]
        fed = [0, 0]
        peak, paused, resumed = 0, [False, False], [False, False]
        while any(fed[i] < len(blobs[i]) for i in range(2)):
            for i, (fill, transport) in enumerate(fills):
                if transport.producerState == "producing" and fed[i] < len(blobs[i]):
                    fill.dataReceived(blobs[i][fed[i] : fed[i] + chunk])
                    fed[i] += chunk
                    peak = max(peak, self.worker.backlog)
                    if transport.producerState == "paused":
                        paused[i] = True
            if all(t.producerState == "paused" or fed[i] >= len(blobs[i])
                   for i, (_, t) in enumerate(fills)):  # fmt: skip
                before = [t.producerState for _, t in fills]
                self.reactor.run_one()
                for i, (_, t) in enumerate(fills):
                    if before[i] == "paused" and t.producerState == "producing":
                        resumed[i] = True
        self.assertLessEqual(peak, self.worker.limit + 2 * chunk)
        self.assertEqual((paused, resumed), ([True, True], [True, True]))
        for fill, _ in fills:
            fill.connectionLost(Failure(ResponseDone()))
        self.reactor.run_until(lambda: all(fill.entry is not None for fill, _ in fills))
        for data in blobs:
            self.assertEqual(self.store.data_path(_digest(data)).read_bytes(), data)
        self.assertEqual(self.worker.backlog, 0)

    def test_readers_see_only_bytes_in_the_file(self) -> None:
        """``written`` (what readers may pread) moves only when the worker says the bytes are in."""
        data = os.urandom(3 * BATCH)
        fill, _ = self.fill(data)
        for i in range(0, len(data), 256 * 1024):
            fill.dataReceived(data[i : i + 256 * 1024])
        self.assertEqual(fill.written, 0)
        woken: list[tuple[int, bytes]] = []

        def follow() -> None:
            # What a reader following the fill can read when it is woken.
            with open(fill.temp.path, "rb") as f:
                woken.append((fill.written, f.read()))
            if not fill.finished:
                fill.wait(follow)

        fill.wait(follow)
        fill.connectionLost(Failure(ResponseDone()))
        self.reactor.run_until(lambda: fill.verified)
        self.assertTrue(woken)
        for written, on_disk in woken:
            self.assertEqual(on_disk[:written], data[:written])
        self.assertEqual(fill.written, len(data))

    def test_publication_runs_on_the_worker(self) -> None:
        """fsync and link into place happen on the worker thread; the index on the reactor's."""
        data = os.urandom(2 * MIB)
        fill, _ = self.fill(data)
        fill.dataReceived(data)
        fill.connectionLost(Failure(ResponseDone()))
        self.reactor.run_until(lambda: fill.entry is not None)
        self.assertNotIn(threading.get_ident(), self.store.commit_threads)
        self.assertEqual(len(self.store.commit_threads), 1)
        self.assertEqual(self.store.get(fill.digest).size, len(data))
        self.assertEqual(self.successResultOf(fill.done), self.store.get(fill.digest))
        self.drain_worker()
        self.assertEqual(list((self.root / "tmp").iterdir()), [])

    def test_publicity_settled_during_publication_reaches_the_disk(self) -> None:
        """A fill found public while the worker wrote its metadata is public after a restart."""
        data = os.urandom(MIB)
        fill, _ = self.fill(data)
        fill.dataReceived(data)
        fill.connectionLost(Failure(ResponseDone()))
        self.reactor.run_until(lambda: fill.verified)
        fill.meta.public = True  # the publicity check answered meanwhile
        self.reactor.run_until(lambda: fill.entry is not None)
        self.drain_worker()
        restarted = BlobStore(self.root, parse_size("1GiB"))
        restarted.rebuild()
        self.assertTrue(restarted.get(fill.digest).meta.public)

    def test_manifest_stored_by_the_worker(self) -> None:
        """A manifest's write and fsync run on the worker; a wrong digest stores nothing."""
        body = b'{"schemaVersion": 2}'
        stored = put_bytes(self.store, self.worker.hasher("sha256"), _digest(body), body, Meta())
        self.assertIsNone(self.store.get(_digest(body)))
        entries: list[object] = []
        stored.addCallback(entries.append)
        self.reactor.run_until(lambda: bool(entries))
        self.assertEqual(entries, [self.store.get(_digest(body))])
        self.assertNotIn(threading.get_ident(), self.store.commit_threads)
        self.assertEqual(self.store.read(_digest(body)), body)
        wrong = put_bytes(self.store, self.worker.hasher("sha256"), _digest(b"x"), body, Meta())
        failed: list[Failure] = []
        wrong.addErrback(failed.append)
        self.reactor.run_until(lambda: bool(failed))
        failed[0].trap(DigestMismatch)
        self.assertIsNone(self.store.get(_digest(b"x")))
        self.assertEqual(list((self.root / "tmp").iterdir()), [])

    def test_full_disk_mid_fill_fails_once_and_releases_the_upstream(self) -> None:
        """ENOSPC on a write: the fill fails once, logged, upstream stopped, nothing cached."""
        logs = LogCatcher(self)
        data = os.urandom(8 * MIB)
        fill, transport = self.fill(data)
        failed = failures(fill)
        fill.dataReceived(data[:MIB])
        self.reactor.run_until(lambda: fill.written == MIB)
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fill.temp._fd)  # the disk is full from now on
        os.close(full)
        for i in range(MIB, 4 * MIB, MIB):
            fill.dataReceived(data[i : i + MIB])
        self.reactor.run_until(lambda: fill.error is not None)
        [failure] = failed
        failure.trap(StoreFailed)
        self.assertEqual(failure.value.written, MIB)
        self.assertIn("No space left on device", fill.error)
        self.assertEqual(transport.producerState, "stopped")
        for i in range(4 * MIB, len(data), MIB):
            fill.dataReceived(data[i : i + MIB])  # bytes already in flight
        fill.connectionLost(Failure(ResponseDone()))
        self.drain_worker()
        self.assertEqual(len(logs.errors()), 1, logs.errors())
        self.assertIsNone(self.store.get(fill.digest))
        self.assertEqual(list((self.root / "tmp").iterdir()), [])
        self.assertEqual(self.worker.backlog, 0)

    def test_stalled_disk_is_bounded(self) -> None:
        """A worker that never answers fails the fill after the idle timeout, not never."""
        stuck = HashWorker(self.reactor)  # never started: nothing it is given runs
        data = os.urandom(MIB)
        fill = Fill(self.store, stuck.hasher("sha256"), _digest(data), Meta(), len(data),
                    self.clock, 30, 30)  # fmt: skip
        failed = failures(fill)
        fill.makeConnection(StringTransport())
        fill.dataReceived(data)
        fill.connectionLost(Failure(ResponseDone()))
        self.clock.advance(29)
        self.assertIsNone(fill.error)
        self.clock.advance(2)
        [failure] = failed
        failure.trap(FillFailed)


class StoreFailureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp())
        self.data = os.urandom(MIB)

    def fill(self, store: BlobStore) -> Fill:
        return Fill(store, InlineHasher("sha256"), _digest(self.data), Meta(), len(self.data),
                    Clock(), 30, 30)  # fmt: skip

    def test_no_free_descriptor_at_the_start(self) -> None:
        """EMFILE creating the temp file: Fill() raises StoreUnavailable, nothing is left behind."""
        store = BlobStore(self.root, parse_size("1GiB"))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowest_free = os.open(os.devnull, os.O_RDONLY)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            with self.assertRaises(StoreUnavailable) as caught:
                self.fill(store)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        self.assertEqual(caught.exception.errno, errno.EMFILE)
        self.assertIsInstance(caught.exception, OSError)
        self.assertEqual(list((self.root / "tmp").iterdir()), [])

    def test_no_room_for_the_blob_at_the_start(self) -> None:
        """A blob larger than the disk's free space: Fill() raises StoreUnavailable (ENOSPC)."""
        store = BlobStore(self.root, parse_size("1GiB"))
        with self.assertRaises(StoreUnavailable) as caught:
            Fill(
                store, InlineHasher("sha256"), _digest(self.data), Meta(), 1 << 60, Clock(), 30, 30
            )
        self.assertEqual(caught.exception.errno, errno.ENOSPC)
        self.assertEqual(list((self.root / "tmp").iterdir()), [])

    def test_full_disk_inline(self) -> None:
        """The in-memory hasher fails a fill on ENOSPC the same way, once."""
        logs = LogCatcher(self)
        fill = self.fill(BlobStore(self.root, parse_size("1GiB")))
        failed = failures(fill)
        transport = StringTransport()
        fill.makeConnection(transport)
        fill.dataReceived(self.data[:1000])
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fill.temp._fd)
        os.close(full)
        fill.dataReceived(self.data[1000:5000])
        fill.dataReceived(self.data[5000:])
        [failure] = failed
        failure.trap(StoreFailed)
        self.assertEqual(fill.written, 1000)
        self.assertEqual(transport.producerState, "stopped")
        self.assertEqual(len(logs.errors()), 1)
        self.assertEqual(list((self.root / "tmp").iterdir()), [])

    def test_publication_failing_lets_readers_finish(self) -> None:
        """Verified bytes whose publication fails: readers complete, nothing is cached."""
        logs = LogCatcher(self)
        store = BrokenCommit(self.root, parse_size("1GiB"))
        fill = self.fill(store)
        failed = failures(fill)
        fill.makeConnection(StringTransport())
        fill.dataReceived(self.data)
        fill.connectionLost(Failure(ResponseDone()))
        [failure] = failed
        failure.trap(StoreFailed)
        self.assertTrue(fill.verified)
        self.assertIsNone(fill.error, "readers would be cut off")
        self.assertEqual(fill.written, len(self.data))
        self.assertIsNone(store.get(fill.digest))
        self.assertEqual(len(logs.errors()), 1)
        self.assertEqual(list((self.root / "tmp").iterdir()), [])
