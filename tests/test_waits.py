"""Every wait has a bound, in memory with a ``task.Clock``: small upstream
bodies that stall, redirect bodies nobody reads, clients that leave, and
clients that stop reading a cached blob."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path

import treq
from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mirrord import tuning
from mirrord.config import Timeouts
from mirrord.store.fill import MIN_CHUNK, READ_CHUNK, FileStreamer
from tests.support.memory import MIRROR, MemoryMirror

BODY_IDLE = 30
CLIENT_IDLE = 300


class StallingUpstream(Resource):
    """Answers every GET with headers and one byte of a longer body, then
    nothing; or, with ``redirect_to``, a 307 whose body stalls the same way.
    Tells which of its connections were closed."""

    isLeaf = True

    def __init__(self, redirect_to: str | None = None) -> None:
        super().__init__()
        self.redirect_to = redirect_to
        self.open = 0
        self.closed = 0

    def render_GET(self, request: Request) -> int:
        if self.redirect_to is not None:
            request.setResponseCode(307)
            request.setHeader(b"location", (self.redirect_to + request.path.decode()).encode())
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"1000")
        request.write(b"{")
        self.open += 1
        request.notifyFinish().addErrback(self._closed)
        return NOT_DONE_YET

    def _closed(self, _: Failure) -> None:
        self.open -= 1
        self.closed += 1


class FullSocket(StringTransport):
    """A client socket that is full after every write, as when the client
    reads nothing: the producer is paused until the test resumes it."""

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and self.streaming:
            self.producer.pauseProducing()

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def body(self) -> bytes:
        return self.value().partition(b"\r\n\r\n")[2]


def _connect(site: Site, path: str) -> tuple[object, FullSocket]:
    """A client of ``site`` on a FullSocket that has sent ``GET path``."""
    channel = site.buildProtocol(None)
    transport = FullSocket()
    channel.makeConnection(transport)
    channel.dataReceived(f"GET {path} HTTP/1.1\r\nHost: mirror.test\r\n\r\n".encode())
    return channel, transport


class SmallBodyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp())

    def mirror(self, upstream: StallingUpstream) -> MemoryMirror:
        mirror = MemoryMirror(
            self, self.tmp, upstreams=("http://stall.test",), timeouts=Timeouts(body_idle=30)
        )
        mirror.add_host(b"stall.test", upstream)
        return mirror

    def test_stalled_manifest_body_gives_504(self) -> None:
        """An upstream manifest that sends one byte and stalls gets the client a
        registry 504 after body_idle, and the upstream connection is closed."""
        upstream = StallingUpstream()
        mirror = self.mirror(upstream)
        digest = "sha256:" + "a" * 64
        d = mirror.client.get(f"{MIRROR}/v2/library/alpine/manifests/{digest}")
        mirror.settle()
        self.assertNoResult(d)
        self.assertEqual(upstream.open, 1)
        mirror.clock.advance(BODY_IDLE - 1)
        mirror.settle()
        self.assertNoResult(d)
        mirror.clock.advance(1)
        mirror.settle()
        response = self.successResultOf(d)
        body = treq.content(response)
        mirror.settle()
        self.assertEqual(response.code, 504)
        self.assertEqual(json.loads(self.successResultOf(body))["errors"][0]["code"], "UNAVAILABLE")
        self.assertEqual((upstream.open, upstream.closed), (0, 1))

    def test_client_leaving_closes_stalled_upstream(self) -> None:
        """A client that leaves while an upstream manifest body stalls closes the
        upstream connection at once, not after any timeout."""
        upstream = StallingUpstream()
        mirror = self.mirror(upstream)
        channel, _ = _connect(mirror.wiring.site, "/v2/library/alpine/manifests/sha256:" + "b" * 64)
        mirror.settle()
        self.assertEqual(upstream.open, 1)
        channel.connectionLost(Failure(ConnectionDone()))
        mirror.settle()
        self.assertEqual((upstream.open, upstream.closed), (0, 1))

    def test_stalled_redirect_body_is_cut(self) -> None:
        """A redirect whose body stalls is followed at once, and its connection
        is closed after body_idle instead of being held forever."""
        upstream = StallingUpstream(redirect_to="http://second.test")
        mirror = self.mirror(upstream)
        digest = mirror.alpine.manifest_digest
        reply = mirror.get(
            f"/v2/library/alpine/manifests/{digest}",
            headers={"Accept": ["application/vnd.oci.image.manifest.v1+json"]},
        )
        self.assertEqual(reply.code, 200)
        self.assertEqual("sha256:" + hashlib.sha256(reply.body).hexdigest(), digest)
        self.assertEqual(upstream.open, 1)
        mirror.clock.advance(BODY_IDLE)
        mirror.settle()
        self.assertEqual((upstream.open, upstream.closed), (0, 1))


class BlobUpstream(Resource):
    isLeaf = True

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = data

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/octet-stream")
        return self.data


class StalledReaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.data = os.urandom(3 * READ_CHUNK + 12345)
        self.digest = "sha256:" + hashlib.sha256(self.data).hexdigest()
        self.mirror = MemoryMirror(self, Path(tempfile.mkdtemp()), upstreams=("http://blobs.test",))
        self.mirror.add_host(b"blobs.test", BlobUpstream(self.data))
        self.path = f"/v2/library/x/blobs/{self.digest}"
        first = self.mirror.get(self.path)
        self.assertEqual(first.body, self.data)
        self.mirror.clock.advance(1)  # published
        self.entry = self.mirror.store.get(self.digest)
        assert self.entry is not None

    def test_client_that_stops_reading_is_cut(self) -> None:
        """A client that reads nothing of a cached blob for client_idle seconds
        is cut off, and the blob is no longer held as being read."""
        channel, transport = _connect(self.mirror.wiring.site, self.path)
        self.assertEqual(len(transport.body()), READ_CHUNK)
        self.assertEqual(self.entry.readers, 1)
        self.mirror.clock.advance(CLIENT_IDLE - 1)
        self.assertFalse(transport.disconnecting)
        self.mirror.clock.advance(1)
        self.assertTrue(transport.disconnected)  # aborted, not closed as if complete
        self.assertEqual(self.entry.readers, 0)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.entry.readers, 0)
        # Nothing of the transfer is left waiting (the status page's
        # once-a-minute sample is the daemon's, not the transfer's).
        sample = self.mirror.wiring.history.sample
        left = [
            call
            for call in self.mirror.clock.getDelayedCalls()
            if getattr(call.func, "f", None) != sample
        ]
        self.assertEqual(left, [])

    def test_slow_reader_is_not_cut(self) -> None:
        """A client that keeps reading, however slowly, gets the whole blob."""
        _, transport = _connect(self.mirror.wiring.site, self.path)
        while len(transport.body()) < len(self.data):
            self.mirror.clock.advance(CLIENT_IDLE - 1)
            self.assertFalse(transport.disconnecting)
            transport.producer.resumeProducing()
        self.assertEqual(transport.body(), self.data)
        self.assertFalse(transport.disconnected)
        self.assertEqual(self.entry.readers, 0)


class _StreamResource(Resource):
    isLeaf = True

    def __init__(self, path: str, size: int, room: int | None, clock: Clock) -> None:
        super().__init__()
        self.path, self.size, self.room, self.clock = path, size, room, clock
        self.outcome: list[object] = []

    def render_GET(self, request: Request) -> int:
        request.setHeader(b"content-length", b"%d" % self.size)
        streamer = FileStreamer(
            request, self.path, 0, self.size, None, self.clock, CLIENT_IDLE, lambda: self.room
        )
        streamer.start().addBoth(self.outcome.append)
        return NOT_DONE_YET


class WriteSizeTests(SynchronousTestCase):
    def first_write(self, room: int | None) -> int:
        """Bytes of the blob in the first write to a client whose socket
        has ``room`` bytes of space."""
        size = 3 * READ_CHUNK
        fd, path = tempfile.mkstemp()
        os.write(fd, os.urandom(size))
        os.close(fd)
        self.addCleanup(os.unlink, path)
        clock = Clock()
        resource = _StreamResource(path, size, room, clock)
        _, transport = _connect(Site(resource, reactor=clock), "/blob")
        return len(transport.body())

    def test_full_socket_gets_a_small_write(self) -> None:
        """A client whose socket has no room is sent one small write, all a
        client that stopped reading can leave in our memory."""
        self.assertEqual(self.first_write(0), MIN_CHUNK)

    def test_write_fits_the_room(self) -> None:
        """A client with some room gets a write of that size."""
        self.assertEqual(self.first_write(300_000), 300_000)

    def test_roomy_socket_gets_large_writes(self) -> None:
        """A client that keeps up gets writes of READ_CHUNK, the fast path's size."""
        self.assertEqual(self.first_write(64 << 20), READ_CHUNK)
        self.assertEqual(self.first_write(None), READ_CHUNK)


class SendRoomTests(SynchronousTestCase):
    def test_room_shrinks_as_a_non_reader_fills_the_socket(self) -> None:
        """send_room reports space on a fresh socket, less for bytes Twisted
        still holds, and none once a client that reads nothing filled it."""
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        client = socket.create_connection(listener.getsockname())
        self.addCleanup(client.close)
        server, _ = listener.accept()
        server.setblocking(False)
        connection = tcp.Connection(server, None, MemoryReactor())
        connection.connected = True  # as the reactor's port would have set it
        self.addCleanup(server.close)
        fresh = tuning.send_room(connection)
        assert fresh is not None
        self.assertGreater(fresh, 0)
        connection.write(b"x" * 1000)  # held by Twisted until the reactor sends it
        self.assertEqual(tuning.send_room(connection), fresh - 1000)
        connection._tempDataBuffer.clear()
        connection._tempDataLen = 0
        try:
            while True:
                server.send(b"x" * (64 << 10))
        except BlockingIOError:
            pass
        self.assertEqual(tuning.send_room(connection), 0)

    def test_no_socket_no_room(self) -> None:
        """Where there is no socket (a test transport) the room is unknown."""
        self.assertIsNone(tuning.send_room(StringTransport()))
