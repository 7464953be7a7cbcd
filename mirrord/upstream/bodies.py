"""Body protocols: relay an upstream body to a client with backpressure,
read small bodies with a bound, and discard bodies nobody needs.

The relay registers the upstream transport as the client request's
producer, so a slow client pauses the upstream socket and memory stays flat
whatever the blob size. Every wait is bounded by the injected clock: an
upstream that goes quiet, or a client that stops reading, ends the transfer.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from mirrord.config import Timeouts
from mirrord.registry.errors import RegistryError
from mirrord.registry.respond import abort_client

log = Logger()


class BodyTooLarge(Exception):
    """A body that should have been small was not."""


class TransferIncomplete(Exception):
    """The upstream body ended early or stalled; the client was cut off."""


@implementer(IPushProducer)
class _RelayProducer:
    """Passes the client's flow control to the upstream transport, and tells
    the relay, so its idle timer measures the right side."""

    def __init__(self, relay: BodyRelay) -> None:
        self._relay = relay

    def pauseProducing(self) -> None:
        self._relay._client_paused()

    def resumeProducing(self) -> None:
        self._relay._client_resumed()

    def stopProducing(self) -> None:
        self._relay.stop()


class BodyRelay(Protocol):
    """Streams an upstream response body into a client ``Request``.

    ``done`` fires with the number of bytes relayed once the client has the
    whole body, or fails with ``TransferIncomplete`` if it could not.
    """

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        body_idle: float,
        client_idle: float,
    ) -> None:
        self._request = request
        self._clock = clock
        self._body_idle = body_idle
        self._client_idle = client_idle
        self._timer: IDelayedCall | None = None
        self._stopped = False
        self._client_waiting = False
        self._failure_reason = ""
        self.relayed = 0
        self.done: Deferred[int] = Deferred(lambda _: self.stop("cancelled"))

    def connectionMade(self) -> None:
        self._request.registerProducer(_RelayProducer(self), True)
        self._request.notifyFinish().addErrback(lambda _: self.stop("client went away"))
        self._arm(self._body_idle, "upstream sent nothing")

    def dataReceived(self, data: bytes) -> None:
        if self._stopped:
            return
        self.relayed += len(data)
        self._request.write(data)
        # Bytes still arriving while the client is paused (the upstream's
        # last read) are not the client making progress: its timer runs on.
        if not self._client_waiting and self._timer is not None and self._timer.active():
            self._timer.reset(self._body_idle)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_timer()
        if self._stopped:
            # The client left (or a timer fired): never touch the request
            # again beyond cutting it, and report why.
            if not self.done.called:
                self.done.errback(Failure(TransferIncomplete(self._failure_reason)))
            return
        self._stopped = True
        self._request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss):
            self._request.finish()
            self.done.callback(self.relayed)
        else:
            abort_client(self._request)
            self.done.errback(
                Failure(TransferIncomplete(f"upstream body failed: {reason.value!r}"))
            )

    def stop(self, why: str = "") -> None:
        """Stop the upstream transfer: the client is gone or a timer fired."""
        if self._stopped:
            return
        self._stopped = True
        self._failure_reason = why
        self._cancel_timer()
        if self.transport is not None:
            self.transport.stopProducing()

    def _client_paused(self) -> None:
        if self._stopped:
            return
        if self.transport is not None:
            self.transport.pauseProducing()
        if not self._client_waiting:
            self._client_waiting = True
            self._arm(self._client_idle, "client stopped reading")

    def _client_resumed(self) -> None:
        if self._stopped:
            return
        self._client_waiting = False
        self._arm(self._body_idle, "upstream sent nothing")
        if self.transport is not None:
            self.transport.resumeProducing()

    def _arm(self, seconds: float, why: str) -> None:
        self._cancel_timer()
        self._timer = self._clock.callLater(seconds, self._timed_out, why)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self, why: str) -> None:
        self._timer = None
        log.warn("transfer stopped: {why} for too long", why=why)
        self.stop(why)
        abort_client(self._request)


def relay_body(
    request: Request, response: IResponse, clock: IReactorTime, timeouts: Timeouts
) -> Deferred[int]:
    """Stream ``response``'s body to ``request`` and finish it.

    Twisted's client strips ``Content-Length`` from a GET response's headers
    and reports it as ``length``: put it back so clients see the true size
    (a HEAD answer keeps the header and has no body).
    """
    if response.length is not UNKNOWN_LENGTH and request.method != b"HEAD":
        request.setHeader(b"Content-Length", b"%d" % response.length)
    relay = BodyRelay(request, clock, timeouts.body_idle, timeouts.client_idle)
    response.deliverBody(relay)
    return relay.done


class BodyTimeout(RegistryError):
    """An upstream body went quiet for longer than its idle bound: the
    client sees a registry 504, never a hang."""


class BoundedReader(Protocol):
    """Collects a small body, failing with ``BodyTooLarge`` past a limit and
    with ``BodyTimeout`` when no byte arrives for ``idle`` seconds.

    Cancelling ``done`` (the client left) stops the upstream body, so its
    connection is released instead of idling until the upstream gives up.
    """

    def __init__(self, limit: int, clock: IReactorTime, idle: float) -> None:
        self._limit = limit
        self._clock = clock
        self._idle = idle
        self._timer: IDelayedCall | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self.done: Deferred[bytes] = Deferred(lambda _: self._stop())

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._idle, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._end(Failure(BodyTooLarge(self._limit)))
            return
        self._chunks.append(data)
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle)

    def connectionLost(self, reason: Any = None) -> None:
        self._cancel_timer()
        if self.done.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)

    def _timed_out(self) -> None:
        self._timer = None
        log.warn("small upstream body: nothing for {idle:g}s, cut", idle=self._idle)
        self._end(
            Failure(BodyTimeout(504, "UNAVAILABLE", f"upstream body stalled for {self._idle:g}s"))
        )

    def _end(self, failure: Failure) -> None:
        """Fail ``done`` and stop the upstream body (its connection goes)."""
        self._cancel_timer()
        self._chunks.clear()
        self.done.errback(failure)
        self._stop()

    def _stop(self) -> None:
        self._cancel_timer()
        self._chunks.clear()
        # The body's transport offers only IPushProducer (no abortConnection):
        # stopping it makes the client protocol drop the connection.
        if self.transport is not None:
            self.transport.stopProducing()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def read_small_body(
    response: IResponse, clock: IReactorTime, idle: float, limit: int = 64 * 1024
) -> Deferred[bytes]:
    """The body of a response that is known to be small (errors, tokens,
    manifests): at most ``limit`` bytes, each wait at most ``idle`` seconds
    on ``clock``. Cancel the result to stop the transfer."""
    reader = BoundedReader(limit, clock, idle)
    response.deliverBody(reader)
    return reader.done


def discard_body(
    response: IResponse, clock: IReactorTime, idle: float, limit: int = 64 * 1024
) -> None:
    """Drain a body nobody needs (a redirect's, say) so its connection can
    go back to the pool; a large or stalling one is cut instead."""
    read_small_body(response, clock, idle, limit).addErrback(lambda _: None)


@implementer(IBodyProducer)
class BytesProducer:
    """A small request body, written at once (no cooperator, no reactor)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass
