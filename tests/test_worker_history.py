"""The status page's traffic history with worker processes: one ring in
the shared directory, sampled by one worker, read the same by all, and
carried on by a sampling worker that was restarted."""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mirrord.front.history import History, SharedRing
from tests.test_status import Counters


class SharedHistoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = Path(tempfile.mkdtemp()) / "history"
        self.clock, self.counters = Clock(), Counters()

    def history(self, sampler: bool, size: int = 1440) -> History:
        ring = SharedRing(self.path, size)
        self.addCleanup(ring.close)
        history = History(lambda: self.counters.now, self.clock, ring=ring, sampler=sampler)
        history.startService()
        self.addCleanup(history.stopService)
        return history

    def test_every_worker_shows_the_same_figures(self) -> None:
        """The sampling worker's minutes, and the minute under way, read the same in the other."""
        first, second = self.history(sampler=True), self.history(sampler=False)
        self.counters.add(hits=5, cache=500)
        self.clock.advance(60)
        self.counters.add(misses=1, upstream=70)
        self.clock.advance(60)
        self.counters.add(hits=2, cache=9)  # under way
        self.assertEqual(len(first.samples), 2)
        self.assertEqual(list(second.samples), list(first.samples))
        self.assertEqual(second.buckets(60, 1), first.buckets(60, 1))
        hour = second.total(60)
        self.assertEqual((hour.hits, hour.misses, hour.cache_bytes), (7, 1, 509))

    def test_a_restarted_sampler_carries_on(self) -> None:
        """A sampling worker started again keeps the ring and counts from the last sample."""
        first = self.history(sampler=True)
        self.counters.add(hits=3)
        self.clock.advance(60)
        first.stopService()
        self.counters.add(hits=4)  # while no worker samples
        again = self.history(sampler=True)
        self.clock.advance(60)
        self.assertEqual([s.hits for s in again.samples], [3, 4])

    def test_the_ring_stays_bounded(self) -> None:
        """Past its size the ring drops its oldest samples, oldest first as read."""
        history = self.history(sampler=True, size=3)
        for minute in range(5):
            self.counters.add(upstream=minute + 1)
            self.clock.advance(60)
        self.assertEqual([s.upstream_bytes for s in history.samples], [3, 4, 5])
        self.assertEqual(self.path.stat().st_size, 8 * (8 + 4 + 3 * 5))
