"""The body relay against real Twisted objects: an HTTPChannel on a
StringTransport for the client, a StringTransport standing in for the
upstream body's transport (it records pause/resume/stop)."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from mirrord.upstream.bodies import BodyRelay, BodyTooLarge, BoundedReader, TransferIncomplete


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

    def test_cancelling_stops_upstream(self) -> None:
        """Cancelling the relay's Deferred (the request's work) stops the upstream."""
        self.relay.done.cancel()
        self.assertEqual(self.upstream.producerState, "stopped")


class BoundedReaderTests(SynchronousTestCase):
    def test_small_body(self) -> None:
        """A body under the limit is collected whole."""
        reader = BoundedReader(10)
        reader.makeConnection(StringTransport())
        reader.dataReceived(b"abc")
        reader.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(reader.done), b"abc")

    def test_large_body_is_cut(self) -> None:
        """A body over the limit fails and its transfer is stopped."""
        transport = StringTransport()
        reader = BoundedReader(4)
        reader.makeConnection(transport)
        reader.dataReceived(b"abcdef")
        self.failureResultOf(reader.done, BodyTooLarge)
        self.assertEqual(transport.producerState, "stopped")
