"""The body relay against real Twisted objects: an HTTPChannel on a
StringTransport for the client, a StringTransport standing in for the
upstream body's transport (it records pause/resume/stop)."""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from mirrord.upstream.bodies import (
    BodyRelay,
    BodyTimeout,
    BodyTooLarge,
    BoundedReader,
    TransferIncomplete,
)


class _RelayResource(Resource):
    isLeaf = True

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.relay: BodyRelay | None = None

    def render_GET(self, request):
        request.setHeader(b"content-length", b"10")
        self.relay = BodyRelay(request, self.clock, body_idle=30, client_idle=60)
        return NOT_DONE_YET


class RelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.resource = _RelayResource(self.clock)
        site = Site(self.resource, reactor=self.clock)
        self.channel = site.buildProtocol(None)
        self.client = StringTransport()
        self.channel.makeConnection(self.client)
        self.channel.dataReceived(b"GET /blob HTTP/1.1\r\nHost: mirror\r\n\r\n")
        self.relay = self.resource.relay
        self.upstream = StringTransport()
        self.relay.makeConnection(self.upstream)
        self.outcomes: list = []
        self.relay.done.addBoth(self.outcomes.append)

    def test_slow_client_pauses_upstream(self) -> None:
        """When the client's socket is full the upstream stops producing, and resumes after."""
        self.relay.dataReceived(b"01234")
        self.client.producer.pauseProducing()
        self.assertEqual(self.upstream.producerState, "paused")
        self.client.producer.resumeProducing()
        self.assertEqual(self.upstream.producerState, "producing")

    def test_complete_body_finishes_request(self) -> None:
        """A whole upstream body is written and the response finished."""
        self.relay.dataReceived(b"01234")
        self.relay.dataReceived(b"56789")
        self.relay.connectionLost(Failure(ResponseDone()))
        self.assertTrue(self.client.value().endswith(b"\r\n\r\n0123456789"))
        self.assertEqual(self.outcomes, [10])
        self.assertFalse(self.client.disconnecting)

    def test_client_disconnect_stops_upstream(self) -> None:
        """A client that goes away stops the upstream transfer at once."""
        self.relay.dataReceived(b"01234")
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.upstream.producerState, "stopped")
        self.relay.connectionLost(Failure(ConnectionDone()))
        self.outcomes[0].trap(TransferIncomplete)

    def test_short_upstream_body_aborts_client(self) -> None:
        """An upstream body that breaks off cuts the client, so it cannot look complete."""
        self.relay.dataReceived(b"01234")
        self.relay.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.client.disconnecting)
        self.outcomes[0].trap(TransferIncomplete)

    def test_idle_upstream_times_out(self) -> None:
        """An upstream that goes quiet mid-body is stopped after body_idle seconds."""
        self.relay.dataReceived(b"01234")
        self.clock.advance(29)
        self.assertEqual(self.upstream.producerState, "producing")
        self.relay.dataReceived(b"5")
        self.clock.advance(29)
        self.assertEqual(self.upstream.producerState, "producing")
        self.clock.advance(2)
        self.assertEqual(self.upstream.producerState, "stopped")
        self.assertTrue(self.client.disconnecting)

    def test_paused_upstream_is_not_idle(self) -> None:
        """Waiting on a slow client is measured by client_idle, not body_idle."""
        self.client.producer.pauseProducing()
        self.clock.advance(59)
        self.assertEqual(self.upstream.producerState, "paused")
        self.clock.advance(2)
        self.assertEqual(self.upstream.producerState, "stopped")
        self.assertTrue(self.client.disconnecting)

    def test_bytes_after_a_pause_do_not_extend_the_client_bound(self) -> None:
        """Upstream bytes that arrive after the client paused do not restart its
        client_idle bound as if it were reading."""
        self.client.producer.pauseProducing()
        self.clock.advance(50)
        self.relay.dataReceived(b"01234")  # the upstream's last read, already in flight
        self.clock.advance(11)
        self.assertEqual(self.upstream.producerState, "stopped")
        self.assertTrue(self.client.disconnecting)

    def test_cancelling_stops_upstream(self) -> None:
        """Cancelling the relay's Deferred (the request's work) stops the upstream."""
        self.relay.done.cancel()
        self.assertEqual(self.upstream.producerState, "stopped")


class BoundedReaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.transport = StringTransport()

    def reader(self, limit: int) -> BoundedReader:
        reader = BoundedReader(limit, self.clock, idle=30)
        reader.makeConnection(self.transport)
        return reader

    def test_small_body(self) -> None:
        """A body under the limit is collected whole."""
        reader = self.reader(10)
        reader.dataReceived(b"abc")
        reader.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(reader.done), b"abc")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_large_body_is_cut(self) -> None:
        """A body over the limit fails and its transfer is stopped."""
        reader = self.reader(4)
        reader.dataReceived(b"abcdef")
        self.failureResultOf(reader.done, BodyTooLarge)
        self.assertEqual(self.transport.producerState, "stopped")

    def test_stalled_body_times_out(self) -> None:
        """A body that sends one byte and stalls fails with a 504 after the idle
        bound, and its upstream transfer is stopped."""
        reader = self.reader(10)
        reader.dataReceived(b"{")
        self.clock.advance(29)
        self.assertNoResult(reader.done)
        self.assertEqual(self.transport.producerState, "producing")
        self.clock.advance(1)
        failure = self.failureResultOf(reader.done, BodyTimeout)
        self.assertEqual(failure.value.status, 504)
        self.assertEqual(self.transport.producerState, "stopped")
        reader.connectionLost(Failure(ConnectionDone()))  # the stop's echo is ignored

    def test_each_byte_restarts_the_idle_bound(self) -> None:
        """A slow but steady body is not cut: the bound is per wait, not per body."""
        reader = self.reader(10)
        for _ in range(5):
            self.clock.advance(20)
            reader.dataReceived(b"a")
        reader.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(reader.done), b"aaaaa")

    def test_cancel_stops_the_upstream(self) -> None:
        """Cancelling the read (the client left) stops the upstream body and its timer."""
        reader = self.reader(10)
        reader.dataReceived(b"{")
        reader.done.cancel()
        self.failureResultOf(reader.done, CancelledError)
        self.assertEqual(self.transport.producerState, "stopped")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        reader.connectionLost(Failure(ConnectionDone()))
