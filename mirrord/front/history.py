"""The last day of traffic, minute by minute, for the status page's chart.

Prometheus keeps history for those who run one; the status page must show
the last hour and day without one. Once a minute (on the injected clock)
the cumulative counters are read and the difference from the previous
reading is kept as one sample, in a ring of at most a day's worth (1440):
memory stays bounded however long the daemon runs. A restart starts an
empty history, as the counters do.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()

MINUTE = 60.0
DAY_MINUTES = 24 * 60


@dataclass(frozen=True)
class Totals:
    """Cumulative counters at one moment."""

    hits: float = 0.0
    misses: float = 0.0
    cache_bytes: float = 0.0
    upstream_bytes: float = 0.0


@dataclass(frozen=True)
class Sample:
    """What happened in the minute that ended at ``end`` (clock seconds)."""

    end: float
    hits: float = 0.0
    misses: float = 0.0
    cache_bytes: float = 0.0
    upstream_bytes: float = 0.0


class History(Service):
    """A ring of per-minute samples of ``read()``, taken on ``clock``."""

    def __init__(
        self,
        read: Callable[[], Totals],
        clock: IReactorTime,
        size: int = DAY_MINUTES,
        interval: float = MINUTE,
    ) -> None:
        self._read = read
        self._clock = clock
        self.interval = interval
        self.samples: deque[Sample] = deque(maxlen=size)
        self._last = read()
        self._loop = LoopingCall(self.sample)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self._last = self._read()
        self._loop.start(self.interval, now=False).addErrback(
            lambda failure: log.failure("traffic history stopped", failure)
        )

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def sample(self) -> None:
        """Keep what happened since the previous sample."""
        self.samples.append(self._since_last(keep=True))

    def _since_last(self, keep: bool) -> Sample:
        # Counters never go down; max() keeps a reset from showing negative.
        now = self._read()
        last = self._last
        if keep:
            self._last = now
        return Sample(
            self._clock.seconds(),
            max(0.0, now.hits - last.hits),
            max(0.0, now.misses - last.misses),
            max(0.0, now.cache_bytes - last.cache_bytes),
            max(0.0, now.upstream_bytes - last.upstream_bytes),
        )

    def buckets(self, minutes: int, width: int) -> list[Sample]:
        """The last ``minutes`` as ``minutes // width`` sums of ``width``
        minutes each, oldest first; minutes not yet sampled count as
        nothing, so a young daemon's chart fills from the right. The minute
        under way counts in the newest bucket: the page is never a minute
        behind."""
        count = minutes // width
        now = self._clock.seconds()
        span = width * self.interval
        sums = [[0.0, 0.0, 0.0, 0.0] for _ in range(count)]
        for s in [*self.samples, self._since_last(keep=False)]:
            # A real clock moves on while we read: the minute under way
            # may end a hair after ``now``.
            index = count - 1 - math.floor(max(0.0, now - s.end) / span)
            if 0 <= index < count:
                into = sums[index]
                into[0] += s.hits
                into[1] += s.misses
                into[2] += s.cache_bytes
                into[3] += s.upstream_bytes
        return [Sample(now - (count - 1 - i) * span, *into) for i, into in enumerate(sums)]

    def total(self, minutes: int) -> Sample:
        """The sum of the last ``minutes`` minutes."""
        return self.buckets(minutes, minutes)[0] if minutes > 0 else Sample(self._clock.seconds())
