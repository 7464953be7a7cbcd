"""Filling the cache from one upstream body while any number of clients
read along, and serving blobs from disk.

A ``Fill`` writes an upstream body to a temporary file, hashing as it goes,
and publishes it only when it matches its digest. Clients never read the
upstream body directly: a ``FileStreamer`` sends from the file and, for a
fill in progress, follows it as it grows. The last byte is held back until
the blob is verified, so a client can never receive a complete wrong blob:
on a mismatch its connection is aborted instead. A fill does not depend on
its readers: when the last one leaves it still completes, bounded by a
timeout, so a retry is a hit.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.server import Request
from zope.interface import implementer

from mirrord.cache import BlobStore, DigestMismatch, Entry, Meta
from mirrord.hashing import Hasher
from mirrord.streaming import abort_client
from mirrord.tuning import send_room

log = Logger()

# Bytes read from the page cache per write to a client, at most: one write
# is one piece of ciphertext for the socket (mirrord/tuning.py). 2 MiB costs
# about 7 % less CPU on a hit (bench/run --rows) but holds 2 MiB more per
# client: 16 clients of a cold blob took peak RSS past 128 MiB.
READ_CHUNK = 1 << 20
# ... and at least, when the client's socket has no room: what a client that
# stopped reading keeps in our memory.
MIN_CHUNK = 64 << 10
# Seconds between verifying a fill and publishing it (fsync, rename): time
# for the readers' last bytes to leave before a long fsync holds the reactor.
PUBLISH_DELAY = 0.05
# Bytes written but not yet hashed above which the upstream is paused.
HASH_BACKLOG = 16 << 20


class FillFailed(Exception):
    """The fill ended without a verified blob."""


class Fill(Protocol):
    """One upstream body becoming one verified blob in the store."""

    def __init__(
        self,
        store: BlobStore,
        hasher: Hasher,
        digest: str,
        meta: Meta,
        expected_size: int | None,
        clock: IReactorTime,
        body_idle: float,
        orphan_timeout: float,
        on_mismatch: Callable[[str], None] = lambda digest: None,
    ) -> None:
        self.store = store
        self.digest = digest
        self.meta = meta
        self.expected_size = expected_size
        self.hasher = hasher
        self.temp = store.new_temp()
        self.hexdigest = ""
        self.written = 0
        self.entry: Entry | None = None
        self.verified = False
        self.error: str | None = None
        self.readers = 0
        self.done: Deferred[Entry] = Deferred()
        self._publishing: IDelayedCall | None = None
        self._clock = clock
        self._body_idle = body_idle
        self._orphan_timeout = orphan_timeout
        self._on_mismatch = on_mismatch
        self._listeners: list[Callable[[], None]] = []
        self._idle: IDelayedCall | None = None
        self._orphaned: IDelayedCall | None = None
        self._waiting_for_hash = False

    @property
    def finished(self) -> bool:
        return self.entry is not None or self.error is not None

    def connectionMade(self) -> None:
        self._idle = self._clock.callLater(self._body_idle, self._abandon, "upstream stalled")

    def dataReceived(self, data: bytes) -> None:
        if self.finished:
            return
        self.temp.write(data)
        self.hasher.update(data)
        self.written += len(data)
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._body_idle)
        if self.hasher.backlog > HASH_BACKLOG and not self._waiting_for_hash:
            self._pause_for_hash()
        self._wake()

    def _pause_for_hash(self) -> None:
        """Hold the upstream while the hash worker catches up: its queue
        is memory."""
        self._waiting_for_hash = True
        self.transport.pauseProducing()

        def resume(_: object) -> None:
            self._waiting_for_hash = False
            if not self.finished:
                if self._idle is not None and self._idle.active():
                    self._idle.reset(self._body_idle)
                self.transport.resumeProducing()

        self.hasher.caught_up().addBoth(resume)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_timers()
        if self.finished:
            return
        if not reason.check(ResponseDone, PotentialDataLoss):
            self._fail(f"upstream body failed: {reason.value!r}")
            return
        self.hasher.hexdigest().addCallbacks(self._hashed, self._not_hashed)

    def _not_hashed(self, failure: Failure) -> None:
        if not self.finished:
            self._fail(f"cannot hash: {failure.value!r}")

    def _hashed(self, hexdigest: str) -> None:
        if self.finished:
            return
        self.hexdigest = hexdigest
        if not self.temp.matches(self.digest, hexdigest, self.expected_size):
            self._publish()  # refuses, counts and fails the fill
            return
        # Verified: readers may send their last byte now. Publishing (fsync,
        # rename) changes no byte; its fsync can hold the reactor while the
        # disk catches up, so let the readers' last bytes leave first.
        self.verified = True
        self._wake()
        self._publishing = self._clock.callLater(PUBLISH_DELAY, self._publish)

    def _publish(self) -> None:
        if self.finished:
            return
        try:
            self.entry = self.store.publish(
                self.temp, self.digest, self.hexdigest, self.meta, self.expected_size
            )
        except DigestMismatch as e:
            log.error("digest mismatch, not cached: {error}", error=str(e))
            self._on_mismatch(self.digest)
            self._fail(str(e))
            return
        except OSError as e:
            self.temp.discard()
            self._fail(f"cannot store {self.digest}: {e}")
            return
        self.store.evict()
        self._wake()
        self.done.callback(self.entry)

    def wait(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` once, when more bytes arrive or the fill ends."""
        self._listeners.append(listener)

    def add_reader(self) -> None:
        self.readers += 1
        if self._orphaned is not None and self._orphaned.active():
            self._orphaned.cancel()

    def remove_reader(self) -> None:
        self.readers -= 1
        if self.readers == 0 and not self.finished and not self.verified:
            self._orphaned = self._clock.callLater(
                self._orphan_timeout, self._abandon, "no reader left and the fill took too long"
            )

    def _abandon(self, why: str) -> None:
        if self.finished:
            return
        log.warn("fill of {digest} abandoned: {why}", digest=self.digest, why=why)
        self._fail(why)
        if self.transport is not None:
            self.transport.stopProducing()

    def _fail(self, why: str) -> None:
        self._cancel_timers()
        self.error = why
        self.temp.discard()
        self._wake()
        self.done.errback(FillFailed(why))
        self.done.addErrback(lambda _: None)

    def _wake(self) -> None:
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener()

    def _cancel_timers(self) -> None:
        for timer in (self._idle, self._orphaned, self._publishing):
            if timer is not None and timer.active():
                timer.cancel()


@implementer(IPushProducer)
class FileStreamer:
    """Sends bytes ``[offset, offset+length)`` of a blob file to a request,
    following ``fill`` while it is still being written.

    Each write is as large as the client's socket can take at once (up to
    ``READ_CHUNK``, at least ``MIN_CHUNK``), so a fast reader gets large
    writes while one that stops reading leaves one small write in our
    memory, not a MiB. A client that keeps the transfer paused for
    ``client_idle`` seconds is cut, and its file, request and reader lease
    are released (Twisted's own idle timeout is off while a request runs).
    """

    def __init__(
        self,
        request: Request,
        path: str | os.PathLike[str],
        offset: int,
        length: int | None,
        fill: Fill | None,
        clock: IReactorTime,
        client_idle: float,
        room: Callable[[], int | None] | None = None,
    ) -> None:
        self._request = request
        self._fd = os.open(path, os.O_RDONLY)
        self._position = offset
        # Unknown only while following a fill whose upstream sent no length.
        self._end = None if length is None else offset + length
        self._fill = fill
        self._clock = clock
        self._client_idle = client_idle
        self._room = room or (lambda: send_room(request.channel and request.channel.transport))
        self._stalled: IDelayedCall | None = None
        self._paused = False
        self._stopped = False
        self._waiting = False
        self.sent = 0
        self.done: Deferred[int] = Deferred()

    def start(self) -> Deferred[int]:
        if self._fill is not None:
            self._fill.add_reader()
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self._close(gone=True))
        self._pump()
        return self.done

    def _known_end(self) -> int | None:
        if self._end is None and self._fill is not None and self._fill.verified:
            return self._fill.written
        return self._end

    def _readable_end(self) -> int:
        fill, end = self._fill, self._known_end()
        if fill is None or fill.verified:
            assert end is not None
            return end
        if end is None:
            # Chunked to the client: the final chunk waits for verification.
            return fill.written
        # Hold the last byte back until the blob is verified.
        return min(fill.written, end - 1)

    def _chunk(self) -> int:
        """Bytes to read for the next write: what the socket takes now."""
        room = self._room()
        if room is None:
            return READ_CHUNK
        return max(MIN_CHUNK, min(READ_CHUNK, room))

    def _pump(self) -> None:
        self._waiting = False
        while not self._stopped:
            if self._fill is not None and self._fill.error is not None:
                self._close(error=self._fill.error)
                return
            end = self._known_end()
            if end is not None and self._position >= end:
                # Even if paused: the file and the reader's lease go now,
                # not when a slow client has read the last write.
                self._close()
                return
            if self._paused:
                return
            available = self._readable_end() - self._position
            if available <= 0:
                self._waiting = True
                assert self._fill is not None
                self._fill.wait(self._pump)
                return
            data = os.pread(self._fd, min(self._chunk(), available), self._position)
            if not data:
                self._close(error="blob file is shorter than expected")
                return
            self._position += len(data)
            self.sent += len(data)
            self._request.write(data)

    def pauseProducing(self) -> None:
        self._paused = True
        if self._stalled is None and not self._stopped:
            self._stalled = self._clock.callLater(self._client_idle, self._client_stalled)

    def resumeProducing(self) -> None:
        self._paused = False
        self._cancel_stalled()
        if not self._waiting and not self._stopped:
            self._pump()

    def stopProducing(self) -> None:
        self._close(gone=True)

    def _client_stalled(self) -> None:
        self._stalled = None
        log.warn(
            "client read nothing for {seconds:g}s: cut after {sent} bytes",
            seconds=self._client_idle,
            sent=self.sent,
        )
        self._close(error="client stopped reading")

    def _cancel_stalled(self) -> None:
        if self._stalled is not None and self._stalled.active():
            self._stalled.cancel()
        self._stalled = None

    def _close(self, error: str | None = None, gone: bool = False) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._cancel_stalled()
        os.close(self._fd)
        if self._fill is not None:
            self._fill.remove_reader()
        if gone:
            self.done.errback(FillFailed("client went away"))
        elif error is not None:
            abort_client(self._request)
            self.done.errback(FillFailed(error))
        else:
            self._request.unregisterProducer()
            self._request.finish()
            self.done.callback(self.sent)


def stream_file(
    request: Request,
    path: Any,
    offset: int,
    length: int | None,
    fill: Fill | None,
    clock: IReactorTime,
    client_idle: float,
) -> Deferred[int]:
    """Send part of a blob file to ``request``; see ``FileStreamer``."""
    return FileStreamer(request, path, offset, length, fill, clock, client_idle).start()
