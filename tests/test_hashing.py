"""The disk worker: a fill's bytes land in its file and its hash in the
order written, progress is reported only for bytes really in the file, the
backlog across fills drains, a failing disk is reported once, and a
stopped worker fails the fill instead of answering a wrong digest."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mirrord.store.disk import TempBlob
from mirrord.store.worker import BATCH, HashingStopped, HashWorker, ThreadHasher
from tests.support.threads import ThreadedReactor


class Progress:
    """What a fill hears from its disk work."""

    def __init__(self, temp: TempBlob) -> None:
        self.temp = temp
        self.written = 0
        self.failures: list[Exception] = []
        self.on_disk_when_told: list[tuple[int, int]] = []

    def wrote(self, size: int) -> None:
        self.written += size
        self.on_disk_when_told.append((self.written, os.stat(self.temp.path).st_size))

    def failed(self, error: Exception) -> None:
        self.failures.append(error)


class DiskWorkerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ThreadedReactor()
        self.worker = HashWorker(self.reactor)
        self.worker.startService()
        self.addCleanup(lambda: self.worker.running and self.worker.stopService())
        self.tmp = Path(tempfile.mkdtemp())

    def hasher(self, name: str = "fill") -> tuple[ThreadHasher, Progress]:
        temp = TempBlob(self.tmp / name)
        hasher = self.worker.hasher("sha256")
        progress = Progress(temp)
        hasher.begin(temp, progress.wrote, progress.failed)
        return hasher, progress

    def digest(self, hasher: ThreadHasher) -> str:
        results: list[str] = []
        hasher.hexdigest().addCallback(results.append)
        self.reactor.run_until(lambda: bool(results))
        return results[0]

    def test_digest_and_file_of_many_pieces_in_order(self) -> None:
        """Small and large pieces, several batches: file and digest hold the bytes in order."""
        pieces = [os.urandom(size) for size in (1, 100, 2047, 2048, 16384, 32768) * 40]
        pieces += [os.urandom(BATCH + 7), os.urandom(3)]
        data = b"".join(pieces)
        hasher, progress = self.hasher()
        for piece in pieces:
            hasher.update(piece)
        self.assertGreater(self.worker.backlog, 0)
        self.assertEqual(self.digest(hasher), hashlib.sha256(data).hexdigest())
        self.assertEqual(progress.written, len(data))
        self.assertEqual(self.worker.backlog, 0)
        self.assertEqual((self.tmp / "fill").read_bytes(), data)

    def test_progress_is_told_only_for_bytes_in_the_file(self) -> None:
        """Readers follow ``written``: it never counts a byte the file does not have yet."""
        hasher, progress = self.hasher()
        for _ in range(12):
            hasher.update(os.urandom(BATCH // 3))
        self.assertEqual(progress.written, 0, "told before the worker wrote anything")
        self.digest(hasher)
        self.assertTrue(progress.on_disk_when_told)
        for told, on_disk in progress.on_disk_when_told:
            self.assertLessEqual(told, on_disk)

    def test_two_fills_interleaved_keep_their_own_digests(self) -> None:
        (a, _), (b, _) = self.hasher("a"), self.hasher("b")
        data_a, data_b = os.urandom(3 * BATCH), os.urandom(2 * BATCH + 1)
        for i in range(0, len(data_a), 65536):
            a.update(data_a[i : i + 65536])
            b.update(data_b[i : i + 65536])
        self.assertEqual(self.digest(a), hashlib.sha256(data_a).hexdigest())
        self.assertEqual(self.digest(b), hashlib.sha256(data_b).hexdigest())
        self.assertEqual((self.tmp / "a").read_bytes(), data_a)
        self.assertEqual((self.tmp / "b").read_bytes(), data_b)

    def test_backlog_counts_every_fill_and_drains(self) -> None:
        """One bound across fills: two fills' bytes together make the worker congested."""
        worker = HashWorker(self.reactor, limit=4 * BATCH)  # not started: nothing drains
        hashers = [worker.hasher("sha256"), worker.hasher("sha256")]
        for i, hasher in enumerate(hashers):
            temp = TempBlob(self.tmp / f"c{i}")
            hasher.begin(temp, lambda n: None, lambda e: None)
        for hasher in hashers:
            hasher.update(os.urandom(2 * BATCH))
        self.assertFalse(hashers[0].congested())
        hashers[1].update(os.urandom(1))
        self.assertTrue(hashers[0].congested())
        drained: list[object] = []
        hashers[0].drained().addCallback(drained.append)
        worker.startService()
        self.addCleanup(worker.stopService)
        self.reactor.run_until(lambda: bool(drained))
        self.assertLessEqual(worker.backlog, worker.limit // 2)

    def test_full_disk_is_reported_once_and_stops_the_writes(self) -> None:
        """A write failing with ENOSPC is told once; no later byte counts as written."""
        hasher, progress = self.hasher()
        hasher.update(os.urandom(BATCH))
        self.reactor.run_until(lambda: progress.written == BATCH)
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, progress.temp._fd)  # the disk is full from now on
        os.close(full)
        for _ in range(5):
            hasher.update(os.urandom(BATCH))
        failed: list[object] = []
        hasher.hexdigest().addErrback(failed.append)
        self.reactor.run_until(lambda: bool(failed))
        self.assertEqual(len(progress.failures), 1)
        self.assertEqual(progress.failures[0].errno, errno.ENOSPC)
        self.assertEqual(progress.written, BATCH)
        self.assertEqual(self.worker.backlog, 0)

    def test_discard_removes_the_file_after_queued_writes(self) -> None:
        """Discarding closes and removes the temp file on the worker, after its writes."""
        hasher, progress = self.hasher()
        for _ in range(4):
            hasher.update(os.urandom(BATCH))
        hasher.discard()
        self.reactor.run_until(lambda: self.worker.backlog == 0)
        done: list[object] = []
        self.worker.run(lambda: None).addCallback(done.append)
        self.reactor.run_until(lambda: bool(done))
        self.assertFalse(progress.temp.path.exists())
        self.assertTrue(progress.temp.closed)
        self.assertLess(progress.written, 4 * BATCH)

    def test_stopped_worker_fails_the_hash(self) -> None:
        """At shutdown a fill's hash fails (the fill is not published), never a wrong digest."""
        hasher, progress = self.hasher()
        hasher.update(b"x" * 4096)
        self.worker.stopService()
        hasher.update(b"y" * BATCH)
        self.failureResultOf(hasher.hexdigest(), HashingStopped)
        self.assertIsInstance(progress.failures[0], HashingStopped)
