"""HTTP/1.0 keep-alive (``ab -k``): a client asking for it keeps its
connection when the answer's end is known (a Content-Length, or no body),
and sees it closed when only a close can end the answer. Raw requests go
to the real site over a ``StringTransport``."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mirrord.front.site import MirrordSite


class _Known(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"hello"  # Twisted sets its Content-Length


class _Streamed(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> int:
        request.write(b"a body of unknown length")
        request.finish()
        return NOT_DONE_YET


def connect(resource: Resource) -> tuple[object, StringTransport]:
    site = MirrordSite(resource, reactor=Clock())
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
    transport = StringTransport(
        peerAddress=IPv4Address("TCP", "127.0.0.1", 4000),
        hostAddress=IPv4Address("TCP", "127.0.0.1", 443),
    )
    channel.makeConnection(transport)
    return channel, transport


class HTTP10KeepAliveTests(SynchronousTestCase):
    def test_known_length_keeps_the_connection(self) -> None:
        """An HTTP/1.0 request with Connection: keep-alive gets its answer with
        Connection: keep-alive and a second answer on the same connection."""
        channel, transport = connect(_Known())
        request = b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"
        for _ in range(2):
            channel.dataReceived(request)
            answer = transport.value()
            transport.clear()
            head, _, body = answer.partition(b"\r\n\r\n")
            self.assertIn(b"Connection: keep-alive", head.split(b"\r\n"))
            self.assertIn(b"Content-Length: 5", head.split(b"\r\n"))
            self.assertEqual(body, b"hello")
            self.assertFalse(transport.disconnecting)

    def test_without_keep_alive_closes(self) -> None:
        """A plain HTTP/1.0 request is answered and its connection closed."""
        channel, transport = connect(_Known())
        channel.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
        self.assertTrue(transport.value().endswith(b"hello"))
        self.assertNotIn(b"keep-alive", transport.value().lower())
        self.assertTrue(transport.disconnecting)

    def test_unknown_length_closes(self) -> None:
        """An HTTP/1.0 keep-alive request whose answer has no Content-Length
        gets the body ended by a close (it has no other end)."""
        channel, transport = connect(_Streamed())
        channel.dataReceived(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertNotIn(b"keep-alive", head.lower())
        self.assertEqual(body, b"a body of unknown length")
        self.assertTrue(transport.disconnecting)
