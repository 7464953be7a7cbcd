"""The last day of traffic, minute by minute, for the status page's chart.

Prometheus keeps history for those who run one; the status page must show
the last hour and day without one. Once a minute (on the injected clock)
the cumulative counters are read and the difference from the previous
reading is kept as one sample, in a ring of at most a day's worth (1440):
memory stays bounded however long the daemon runs. A restart starts an
empty history, as the counters do.

With worker processes the ring is one file in the workers' shared
directory (``SharedRing``): one worker samples the totals of all (see
``mirrord.metrics``), every worker renders from the same ring, so the page
shows the same figures whichever worker answers; a sampling worker that is
restarted carries on the ring where the dead one left it.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from pathlib import Path

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


class _LocalRing:
    """The samples and the last reading in this process's memory."""

    def __init__(self, size: int) -> None:
        self.samples: deque[Sample] = deque(maxlen=size)
        self.last = Totals()

    def begin(self, read: Callable[[], Totals]) -> None:
        self.last = read()

    def append(self, sample: Sample, last: Totals) -> None:
        self.samples.append(sample)
        self.last = last


_MAGIC = int.from_bytes(b"mrdhist1", "little")
_HEADER = 8  # words: magic, size, count, next, has last, spare; then 4 for last
_FIELDS = 5  # end, hits, misses, cache bytes, upstream bytes


class SharedRing:
    """The ring in a file that the workers map: the samples and the last
    reading, under an ``fcntl`` lock held while they are copied."""

    def __init__(self, path: Path, size: int = DAY_MINUTES) -> None:
        self._size = size
        length = 8 * (_HEADER + 4 + size * _FIELDS)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            with self._locked():
                if os.fstat(self._fd).st_size == 0:
                    os.ftruncate(self._fd, length)
                    os.pwrite(self._fd, _MAGIC.to_bytes(8, "little"), 0)
                    os.pwrite(self._fd, size.to_bytes(8, "little"), 8)
                elif os.fstat(self._fd).st_size != length:
                    raise ValueError(f"{path} holds another number of samples")
            self._map = mmap.mmap(self._fd, length)
        except BaseException:
            os.close(self._fd)
            raise
        self._q = memoryview(self._map).cast("Q")
        self._d = memoryview(self._map).cast("d")

    def close(self) -> None:
        self._q.release()
        self._d.release()
        self._map.close()
        os.close(self._fd)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def begin(self, read: Callable[[], Totals]) -> None:
        """The first reading, unless a worker before this one took it."""
        with self._locked():
            if not self._q[4]:
                self._set_last(read())
                self._q[4] = 1

    def _set_last(self, last: Totals) -> None:
        for i, value in enumerate(astuple(last)):
            self._d[_HEADER + i] = value

    @property
    def last(self) -> Totals:
        with self._locked():
            return Totals(*self._d[_HEADER : _HEADER + 4].tolist())

    @property
    def samples(self) -> Sequence[Sample]:
        """Oldest first, as a deque of the same ``size`` would hold them."""
        with self._locked():
            count, following = self._q[2], self._q[3]
            first = _HEADER + 4
            flat = self._d[first : first + self._size * _FIELDS].tolist()
        rows = [Sample(*flat[i * _FIELDS : (i + 1) * _FIELDS]) for i in range(self._size)]
        ordered = rows[following:] + rows[:following] if count == self._size else rows[:count]
        return ordered

    def append(self, sample: Sample, last: Totals) -> None:
        with self._locked():
            count, following = self._q[2], self._q[3]
            at = _HEADER + 4 + following * _FIELDS
            for i, value in enumerate(astuple(sample)):
                self._d[at + i] = value
            self._q[3] = (following + 1) % self._size
            self._q[2] = min(count + 1, self._size)
            self._set_last(last)
            self._q[4] = 1


class History(Service):
    """A ring of per-minute samples of ``read()``, taken on ``clock``.
    ``ring``: the workers' ``SharedRing``, where only the ``sampler``
    worker adds samples; None in the one process."""

    def __init__(
        self,
        read: Callable[[], Totals],
        clock: IReactorTime,
        size: int = DAY_MINUTES,
        interval: float = MINUTE,
        ring: SharedRing | None = None,
        sampler: bool = True,
    ) -> None:
        self._read = read
        self._clock = clock
        self.interval = interval
        self._ring: _LocalRing | SharedRing = _LocalRing(size) if ring is None else ring
        self._sampler = sampler
        self._ring.begin(read)
        self._loop = LoopingCall(self.sample)
        self._loop.clock = clock

    @property
    def samples(self) -> Sequence[Sample]:
        return self._ring.samples

    def startService(self) -> None:
        super().startService()
        if isinstance(self._ring, _LocalRing):
            self._ring.begin(self._read)
        self._loop.start(self.interval, now=False).addErrback(
            lambda failure: log.failure("traffic history stopped", failure)
        )

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def sample(self) -> None:
        """Keep what happened since the previous sample."""
        if self._sampler:
            now = self._read()
            self._ring.append(self._since(self._ring.last, now), now)

    def _since_last(self) -> Sample:
        return self._since(self._ring.last, self._read())

    def _since(self, last: Totals, now: Totals) -> Sample:
        # Counters never go down; max() keeps a reset from showing negative.
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
        for s in [*self.samples, self._since_last()]:
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
