"""Filling the cache from one upstream body while any number of clients
read along, and serving blobs from disk.

A ``Fill`` hands an upstream body to the disk worker (``mirrord.store.worker``),
which writes it to a temporary file and hashes it, and publishes it only
when it matches its digest. Clients never read the upstream body directly:
a ``FileStreamer`` sends from the file and, for a fill in progress, follows
it as it grows, up to ``Fill.written``: the bytes the worker reported in
the file. The last byte is held back until the blob is verified, so a
client can never receive a complete wrong blob: on a mismatch its
connection is aborted instead. A fill does not depend on its readers: when
the last one leaves it still completes, bounded by a timeout, so a retry is
a hit.

A fill survives a cut: when its upstream body stops early (the connection
closed, an error, no progress for ``body_idle``) it asks its owner for a
continuation body from the bytes it has received (a ``Range`` request,
``resume``), up to ``resume_attempts`` times within ``resume_window``
seconds of the first cut, and takes that body's bytes as if the first had
gone on: the hash continues over them, readers never see the seam. Only
when every attempt failed does the fill fail.

When the disk fails the cache, not the client: a temporary file that
cannot be created raises ``StoreUnavailable`` from ``Fill()`` before
anything is sent; a write that fails mid-fill fails the fill once, with
``StoreFailed``, logged, its upstream released and its file removed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from mirrord.store.disk import BlobStore, Entry, Meta, matches
from mirrord.store.shared import Claim, describe
from mirrord.store.worker import Hasher
from mirrord.tuning import send_room
from mirrord.upstream.bodies import abort_client, discard_body

log = Logger()

# Bytes read from the page cache per write to a client, at most: one write
# is one piece of ciphertext for the socket (mirrord/tuning.py). 2 MiB costs
# about 7 % less CPU on a hit (bench/run --rows) but holds 2 MiB more per
# client: 16 clients of a cold blob took peak RSS past 128 MiB.
READ_CHUNK = 1 << 20
# ... and at least, when the client's socket has no room: what a client that
# stopped reading keeps in our memory.
MIN_CHUNK = 64 << 10


class FillFailed(Exception):
    """The fill ended without a verified blob."""


class StoreFailed(FillFailed):
    """The cache's disk failed the fill (a write, or publishing it); the
    upstream bytes were fine. ``written`` bytes had reached the file."""

    def __init__(self, reason: str, written: int) -> None:
        super().__init__(reason)
        self.written = written


# Asks the upstream again for the blob from byte ``offset`` on: a live
# response whose body is not read yet, or None when the upstream refused.
Resume = Callable[[int], "Deferred[IResponse | None]"]


class _Part(Protocol):
    """A continuation body, after a cut: its bytes go on from where the
    fill's stopped. ``skip`` bytes are dropped first (an upstream that
    ignored ``Range`` and sent the whole blob again)."""

    def __init__(self, fill: Fill, skip: int) -> None:
        self.fill = fill
        self.skip = skip

    def connectionMade(self) -> None:
        self.fill._body_started(self)

    def dataReceived(self, data: bytes) -> None:
        if self.skip:
            dropped = min(self.skip, len(data))
            self.skip -= dropped
            data = data[dropped:]
            self.fill._still_going()
            if not data:
                return
        self.fill._data(self, data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.fill._lost(self, reason)


def range_start(headers: Headers) -> tuple[int, int | None] | None:
    """(first byte, total size or None) of ``Content-Range: bytes a-b/n``."""
    values = headers.getRawHeaders(b"content-range")
    if not values:
        return None
    unit, _, rest = values[-1].strip().partition(b" ")
    span, _, total = rest.partition(b"/")
    first = span.partition(b"-")[0]
    if unit.lower() != b"bytes" or not first.isdigit():
        return None
    return int(first), int(total) if total.isdigit() else None


class Fill(Protocol):
    """One upstream body becoming one verified blob in the store.

    Raises ``StoreUnavailable`` (an ``OSError``) when its temporary file
    cannot be created: no room for ``expected_size``, no free descriptor."""

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
        resume: Resume | None = None,
        resume_attempts: int = 0,
        resume_window: float = 600.0,
        on_resume: Callable[[int], None] = lambda offset: None,
        claim: Claim | None = None,
    ) -> None:
        self.store = store
        self.digest = digest
        self.meta = meta
        self.expected_size = expected_size
        self.hasher = hasher
        self.temp = store.new_temp(expected_size, claim)
        self.hexdigest = ""
        # Bytes in the temporary file (not merely received): readers' limit.
        self.written = 0
        # Bytes handed to the disk worker: where a resumed body starts (the
        # worker's queue lies between the two; it is in order, so the hash
        # continues over the continuation's bytes).
        self.received = 0
        self.resumes = 0
        self.entry: Entry | None = None
        self.verified = False
        # Why the fill failed; readers stop at once.
        self.error: str | None = None
        # The cache's disk failed it (the upstream bytes were fine): readers
        # hand their client over to the upstream instead of cutting it.
        self.store_failed = False
        # Why a verified fill was not cached; readers still finish.
        self.unpublished: str | None = None
        self.readers = 0
        self.done: Deferred[Entry] = Deferred()
        self._clock = clock
        self._body_idle = body_idle
        self._orphan_timeout = orphan_timeout
        self._on_mismatch = on_mismatch
        self._listeners: list[Callable[[], None]] = []
        self._idle: IDelayedCall | None = None
        self._orphaned: IDelayedCall | None = None
        self._waiting_for_disk = False
        self._body_ended = False
        # The body whose bytes count (this fill itself, then a _Part per
        # resume); None while a resume is being asked for.
        self._body: Protocol | None = None
        self._upstream: Any = None
        self._resume = resume
        self._resume_attempts = resume_attempts
        self._resume_window = resume_window
        self._on_resume = on_resume
        self._first_cut: float | None = None
        self._resuming: Deferred[IResponse | None] | None = None
        hasher.begin(self.temp, self._written, self._disk_failed)
        if claim is not None:
            # Other processes follow this file: what they need of the
            # upstream's answer, before its first byte (the worker is in order).
            about = {"meta": asdict(meta), "size": expected_size}
            hasher.run(describe, claim, about).addErrback(
                lambda f: log.warn("cannot describe the fill of {digest}: {e}", digest=digest, e=f)
            )

    @property
    def path(self) -> str:
        """The file readers follow."""
        return str(self.temp.path)

    @property
    def finished(self) -> bool:
        return self.entry is not None or self.error is not None or self.unpublished is not None

    def connectionMade(self) -> None:
        self._body_started(self)
        self._idle = self._clock.callLater(self._body_idle, self._idle_out)

    def dataReceived(self, data: bytes) -> None:
        self._data(self, data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._lost(self, reason)

    def _body_started(self, body: Protocol) -> None:
        self._body = body
        self._body_ended = False
        self._upstream = body.transport
        if self._waiting_for_disk:
            self._upstream.pauseProducing()

    def _data(self, body: Protocol, data: bytes) -> None:
        if self.finished or body is not self._body:
            return
        self.received += len(data)
        self.hasher.update(data)
        self._still_going()
        if self.hasher.congested() and not self._waiting_for_disk and not self.finished:
            self._pause_for_disk()

    def _written(self, size: int) -> None:
        """The disk worker put ``size`` more bytes in the file."""
        if self.finished:
            return
        self.written += size
        self._still_going()
        self._wake()

    def _still_going(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._body_idle)

    def _pause_for_disk(self) -> None:
        """Hold the upstream while the disk worker catches up: its queue is
        memory, shared by every fill."""
        self._waiting_for_disk = True
        self._upstream.pauseProducing()

        def resume(_: object) -> None:
            self._waiting_for_disk = False
            if not self.finished and not self._body_ended and self._body is not None:
                self._still_going()
                self._upstream.resumeProducing()

        self.hasher.drained().addBoth(resume)

    def _lost(self, body: Protocol, reason: Failure) -> None:
        if body is not self._body:
            return  # a body given up on after a cut
        self._body_ended = True
        if self.finished:
            self._cancel_timers()
            return
        if not reason.check(ResponseDone, PotentialDataLoss):
            self._cut(f"upstream body failed: {reason.value!r}")
            return
        # The worker may still hold bytes: its progress keeps this alive.
        self._still_going()
        self.hasher.hexdigest().addCallbacks(self._hashed, self._not_hashed)

    def _idle_out(self) -> None:
        """Nothing moved for ``body_idle``: a stalled upstream is a cut; a
        stalled resume request is a failed attempt; a stalled disk fails."""
        if self.finished:
            return
        if self._resuming is not None:
            self._resuming.cancel()  # its errback counts the attempt
        elif self._body is not None and not self._body_ended:
            self._body = None
            self._upstream.stopProducing()
            self._cut("no progress from the upstream")
        else:
            self._abandon("no progress from the disk")

    def _cut(self, why: str) -> None:
        """The upstream body stopped before the blob's end: ask for the
        rest, or fail when no attempt is left."""
        self._body = None
        now = self._clock.seconds()
        if self._first_cut is None:
            self._first_cut = now
        if (
            self._resume is None
            or self.resumes >= self._resume_attempts
            or now - self._first_cut > self._resume_window
        ):
            tried = f" ({self.resumes} resumes)" if self.resumes else ""
            log.warn(
                "fill of {digest} failed: {why}{tried}", digest=self.digest, why=why, tried=tried
            )
            self._fail(why + tried)
            return
        self.resumes += 1
        log.warn(
            "fill of {digest} cut at {offset} bytes ({why}): resume {attempt} of {attempts}",
            digest=self.digest,
            offset=self.received,
            why=why,
            attempt=self.resumes,
            attempts=self._resume_attempts,
        )
        if self._idle is None or not self._idle.active():
            self._idle = self._clock.callLater(self._body_idle, self._idle_out)
        self._still_going()
        offset = self.received
        self._on_resume(offset)
        self._resuming = resuming = self._resume(offset)
        resuming.addCallbacks(self._resumed, self._not_resumed, callbackArgs=(offset,))

    def _resumed(self, response: IResponse | None, offset: int) -> None:
        self._resuming = None
        if self.finished:
            if response is not None:
                discard_body(response, self._clock, self._body_idle)
            return
        if response is None:
            self._cut("the upstream refused to resume")
            return
        skip = 0
        if response.code == 206:
            span = range_start(response.headers)
            total = None if span is None else span[1]
            if (
                span is None
                or span[0] != offset
                or (None not in (total, self.expected_size) and total != self.expected_size)
            ):
                discard_body(response, self._clock, self._body_idle)
                self._cut(f"asked for bytes from {offset}, got a range {span}")
                return
        elif response.code == 200 and (
            response.length is UNKNOWN_LENGTH
            or self.expected_size is None
            or response.length == self.expected_size
        ):
            # The upstream ignored Range: the whole blob again. Dropping what
            # we have costs bandwidth, not memory, and still completes the
            # fill (and the digest is checked over the whole); giving up
            # would fail every fill behind such an upstream.
            skip = offset
        else:
            discard_body(response, self._clock, self._body_idle)
            self._cut(f"the upstream answered {response.code} to a resume")
            return
        self._still_going()
        response.deliverBody(_Part(self, skip))

    def _not_resumed(self, failure: Failure) -> None:
        self._resuming = None
        if self.finished:
            return
        if failure.check(CancelledError):
            self._cut("the resume request stalled")
        else:
            self._cut(f"cannot resume: {failure.value!r}")

    def _not_hashed(self, failure: Failure) -> None:
        if not self.finished:
            self._fail(f"cannot hash: {failure.value!r}")

    def _hashed(self, hexdigest: str) -> None:
        if self.finished:
            return
        self._cancel_timers()
        self.hexdigest = hexdigest
        if not matches(self.digest, hexdigest, self.written, self.expected_size):
            why = f"{self.digest}: received {self.written} bytes hashing to {hexdigest[:16]}..."
            log.error("digest mismatch, not cached: {error}", error=why)
            self._on_mismatch(self.digest)
            self._fail(why)
            return
        # Verified: readers may send their last byte now. Publishing (fsync,
        # link, metadata) is the disk worker's, after this fill's writes.
        self.verified = True
        self._wake()
        when = self.store.now()
        meta = asdict(self.meta)
        self.hasher.run(
            self.store.commit, self.temp, self.digest, json.dumps(meta).encode(), when
        ).addCallbacks(
            self._committed,
            self._not_committed,
            callbackArgs=(meta, when),
        )

    def _committed(self, _: None, meta: dict[str, Any], when: float) -> None:
        if self.finished:
            return
        self.entry = self.store.add(self.digest, self.written, self.meta, when)
        if asdict(self.meta) != meta:
            # Its publicity was settled while the worker wrote the old one.
            self.hasher.run(
                self.store.write_meta, self.digest, json.dumps(asdict(self.meta)).encode()
            ).addErrback(
                lambda f: log.warn(
                    "metadata of {digest} not updated: {error}", digest=self.digest, error=f.value
                )
            )
        self.hasher.discard()  # the temp name; the blob is linked in place
        self.store.evict()
        self._wake()
        self.done.callback(self.entry)

    def _not_committed(self, failure: Failure) -> None:
        if self.finished:
            return
        why = f"cannot store {self.digest}: {failure.value}"
        log.error("fill verified but not cached: {why}", why=why)
        self.unpublished = why
        self.hasher.discard()
        self._wake()
        self.done.errback(StoreFailed(why, self.written))
        self.done.addErrback(lambda _: None)

    def _disk_failed(self, error: Exception) -> None:
        """A write to the temporary file failed (disk full, I/O error) or
        the worker stopped: the fill fails, its upstream is released."""
        if self.finished:
            return
        why = f"cannot write the cache file: {error}"
        log.error("fill of {digest} stopped, not cached: {why}", digest=self.digest, why=why)
        self.store_failed = True
        self._fail(why, StoreFailed(why, self.written))
        self._release_upstream()

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
        self._release_upstream()

    def _release_upstream(self) -> None:
        if self._upstream is not None and self._body is not None and not self._body_ended:
            self._body = None
            self._upstream.stopProducing()

    def _fail(self, why: str, error: FillFailed | None = None) -> None:
        self._cancel_timers()
        if self._resuming is not None:
            resuming, self._resuming = self._resuming, None
            resuming.cancel()
        self.error = why
        self.hasher.discard()
        self._wake()
        self.done.errback(error or FillFailed(why))
        self.done.addErrback(lambda _: None)

    def _wake(self) -> None:
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener()

    def _cancel_timers(self) -> None:
        for timer in (self._idle, self._orphaned):
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
        path: str | os.PathLike[str] | int,
        offset: int,
        length: int | None,
        fill: Fill | None,
        clock: IReactorTime,
        client_idle: float,
        room: Callable[[], int | None] | None = None,
    ) -> None:
        self._request = request
        # An int: an open descriptor (a followed fill's), read through a copy.
        self._fd = os.dup(path) if isinstance(path, int) else os.open(path, os.O_RDONLY)
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
        if fill.expected_size is not None and end < fill.expected_size:
            # A range short of the blob's end (a client resuming, or
            # fetching a part): it is not the blob, nothing to hold back.
            return min(fill.written, end)
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
                if self._fill.store_failed:
                    self._hand_over()
                else:
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

    def _hand_over(self) -> None:
        """The cache's disk failed, not the upstream: stop here, the client
        still connected and its body unfinished, for the caller to send the
        rest from upstream (``StoreFailed`` says from where)."""
        if not self._release():
            return
        self._request.unregisterProducer()
        assert self._fill is not None
        self.done.errback(StoreFailed(self._fill.error or "", self._position))

    def _close(self, error: str | None = None, gone: bool = False) -> None:
        if not self._release():
            return
        if gone:
            self.done.errback(FillFailed("client went away"))
        elif error is not None:
            abort_client(self._request)
            self.done.errback(FillFailed(error))
        else:
            self._request.unregisterProducer()
            self._request.finish()
            self.done.callback(self.sent)

    def _release(self) -> bool:
        """Stop once: the timer, the file and the fill's reader count.
        False if already stopped."""
        if self._stopped:
            return False
        self._stopped = True
        self._cancel_stalled()
        os.close(self._fd)
        if self._fill is not None:
            self._fill.remove_reader()
        return True


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
