"""One access event per request, however the request ended."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mirrord.front.site import build_site


class _Answers(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Request] = []

    def render_GET(self, request: Request) -> bytes | int:
        if request.path == b"/v2/hold":
            self.held.append(request)
            return NOT_DONE_YET
        return b"hello"


class AccessEventTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[LogEvent] = []

        def access(event: LogEvent) -> None:
            if event.get("log_namespace") == "mirrord.access":
                self.events.append(event)

        globalLogPublisher.addObserver(access)
        self.addCleanup(globalLogPublisher.removeObserver, access)
        self.answers = _Answers()
        self.site = build_site(
            registry_proxy=self.answers,
            token_proxy=Resource(),
            usage=lambda request: b"",
            metrics=Resource(),
            reactor=Clock(),
            client_idle=60,
        )
        self.transport = StringTransport(
            peerAddress=IPv4Address("TCP", "10.0.0.7", 5555),
            hostAddress=IPv4Address("TCP", "127.0.0.1", 443),
        )
        self.channel = self.site.buildProtocol(None)
        self.channel.makeConnection(self.transport)

    def get(self, path: str) -> None:
        self.channel.dataReceived(f"GET {path} HTTP/1.1\r\nHost: m\r\n\r\n".encode())

    def test_answered_requests_are_logged_once_each(self) -> None:
        """Each answered request on a kept-alive connection logs one event, ok."""
        self.get("/v2/a")
        self.get("/v2/b")
        self.assertEqual(
            [(e["path"], e["status"], e["outcome"], e["bytes"]) for e in self.events],
            [("/v2/a", 200, "ok", 5), ("/v2/b", 200, "ok", 5)],
        )
        self.assertEqual(self.events[0]["client"], "10.0.0.7")
        self.assertTrue(self.site.when_idle().called)

    def test_client_that_leaves_is_logged_once(self) -> None:
        """A client gone before its answer logs one event saying so, and the
        site is idle again."""
        self.get("/v2/hold")
        self.assertEqual(self.events, [])
        self.assertFalse(self.site.when_idle().called)
        self.channel.connectionLost(Failure(ConnectionError("gone")))
        self.assertEqual(
            [(e["path"], e["outcome"]) for e in self.events], [("/v2/hold", "client disconnected")]
        )
        self.assertTrue(self.site.when_idle().called)
