"""Following another process's fill of a blob, from its growing file.

When another process sharing the cache directory holds a digest's fill
lock (``mirrord.store.shared``), this process does not fetch the blob
again: a ``RemoteFill`` stands where a ``Fill`` would in the in-flight
table, and its readers (``FileStreamer``) follow the same file. It learns
the file's progress by probing it on the disk worker every ``interval``
seconds of the injected clock: bytes written so far, then ``verified``
once the filler published the blob (the filler links it in place only
after its digest matched), so the last byte is released only then, as for
a local fill.

Every wait is bounded: a fill that makes no progress for ``idle`` seconds,
or whose lock is let go without a published blob (the filler failed or
died), ends the follow with an error; its readers' clients are cut at the
byte they had, never sent a whole unverified blob. The next request then
takes the lock and fills afresh.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mirrord.store.disk import BlobStore, Entry, Meta
from mirrord.store.fill import FillFailed
from mirrord.store.shared import Claim, Probe

log = Logger()

T = TypeVar("T")
Run = Callable[..., "Deferred[Any]"]

# Seconds between two looks at another process's fill: its readers lag
# the filler by about this much.
FOLLOW_EVERY = 0.05


class RemoteFill:
    """Another process's fill of ``digest``, seen through ``claim`` (an
    unlocked descriptor on its file). ``run`` runs blocking calls on the
    disk worker. ``ready`` fires (with this) once the filler said what the
    upstream sent (media type, size), or fails."""

    # The disk of this process never fails a remote fill (see ``Fill``).
    store_failed = False
    unpublished: str | None = None

    def __init__(
        self,
        store: BlobStore,
        claim: Claim,
        digest: str,
        run: Run,
        clock: IReactorTime,
        idle: float,
        orphan_timeout: float,
        interval: float = FOLLOW_EVERY,
    ) -> None:
        self.store = store
        self.claim = claim
        self.digest = digest
        self.meta = Meta()
        self.expected_size: int | None = None
        self.written = 0
        self.verified = False
        self.error: str | None = None
        self.entry: Entry | None = None
        self.readers = 0
        self.ready: Deferred[RemoteFill] = Deferred()
        self.done: Deferred[Entry] = Deferred()
        self._run = run
        self._clock = clock
        self._idle = idle
        self._orphan_timeout = orphan_timeout
        self._interval = interval
        self._described = False
        self._last_progress = clock.seconds()
        self._timer: IDelayedCall | None = None
        self._orphaned: IDelayedCall | None = None
        self._listeners: list[Callable[[], None]] = []

    @property
    def path(self) -> str:
        return str(self.claim.path)

    @property
    def source(self) -> int:
        """What readers stream from: the claim's descriptor (they dup it),
        never the path, which may name another fill's file by then; only
        this descriptor's file is ever called published (``shared.probe``)."""
        return self.claim.fd

    @property
    def finished(self) -> bool:
        return self.entry is not None or self.error is not None

    def start(self) -> Deferred[RemoteFill]:
        log.info("{digest}: another process is filling it; following its file", digest=self.digest)
        self._poll()
        return self.ready

    def _poll(self) -> None:
        self._timer = None
        if self.finished:
            return
        self._run(self.store.probe, self.claim).addCallbacks(self._seen, self._not_seen)

    def _seen(self, probe: Probe) -> None:
        if self.finished:
            return
        now = self._clock.seconds()
        if probe.about is not None and not self._described:
            try:
                self.meta = Meta(**probe.about["meta"])
                self.expected_size = probe.about["size"]
            except (TypeError, KeyError) as e:
                self._fail(f"the fill's description is unreadable: {e!r}")
                return
            self._described = True
        if probe.published:
            self._published(probe.size)
            return
        if probe.abandoned:
            self._fail("the process filling it stopped without a verified blob")
            return
        if probe.size > self.written:
            self.written = probe.size
            self._last_progress = now
            self._wake()
        elif now - self._last_progress > self._idle:
            self._fail(f"the process filling it made no progress for {self._idle:g}s")
            return
        if self._described and not self.ready.called:
            self.ready.callback(self)
        self._timer = self._clock.callLater(self._interval, self._poll)

    def _not_seen(self, failure: Failure) -> None:
        self._fail(f"cannot follow the fill: {failure.value!r}")

    def _published(self, size: int) -> None:
        self.written = size
        self.verified = True
        self.entry = self.store.adopt(Entry(self.digest, size, self.meta, self.store.now()))
        self._close()
        if not self.ready.called:
            self.ready.callback(self)
        self._wake()
        self.done.callback(self.entry)

    def _fail(self, why: str) -> None:
        log.warn("following {digest} failed: {why}", digest=self.digest, why=why)
        self.error = why
        self._close()
        self._wake()
        if not self.ready.called:
            self.ready.errback(FillFailed(why))
        self.done.errback(FillFailed(why))
        self.done.addErrback(lambda _: None)

    def _close(self) -> None:
        for timer in (self._timer, self._orphaned):
            if timer is not None and timer.active():
                timer.cancel()
        self._run(self.claim.release).addErrback(lambda _: None)

    def wait(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` once, when more bytes are in the file or the follow ends."""
        self._listeners.append(listener)

    def add_reader(self) -> None:
        self.readers += 1
        if self._orphaned is not None and self._orphaned.active():
            self._orphaned.cancel()

    def remove_reader(self) -> None:
        self.readers -= 1
        if self.readers == 0 and not self.finished:
            self._orphaned = self._clock.callLater(
                self._orphan_timeout, self._fail, "no reader left"
            )

    def _wake(self) -> None:
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener()
