"""One upstream fetch per digest, whatever clients do: leaders that leave
before the upstream answers or mid-body, followers the privacy rule turns
away, one digest through two registries, and a start that failed once."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mirrord.config import Registry
from tests.support.memory import MIRROR, MemoryMirror


class Gate(Resource):
    """Serves blobs by digest and counts GETs. It can park requests before
    any header (``park``), stop after ``hold_at`` bytes, or answer parked
    requests 503 (``fail_parked``)."""

    isLeaf = True

    def __init__(self, blobs: dict[str, bytes]) -> None:
        super().__init__()
        self.blobs = blobs
        self.gets = 0
        self.park = False
        self.fail_parked = False
        self.hold_at: int | None = None
        self.parked: list[Request] = []
        self.held: list[tuple[Request, bytes]] = []

    def render_GET(self, request: Request) -> bytes | int:
        self.gets += 1
        if self.park:
            self.parked.append(request)
            return NOT_DONE_YET
        return self._answer(request)

    def _answer(self, request: Request) -> bytes | int:
        data = self.blobs[request.path.decode().rsplit("/", 1)[-1]]
        request.setHeader(b"content-length", b"%d" % len(data))
        request.setHeader(b"content-type", b"application/octet-stream")
        if self.hold_at is None:
            return data
        request.write(data[: self.hold_at])
        self.held.append((request, data[self.hold_at :]))
        return NOT_DONE_YET

    def answer_parked(self) -> None:
        parked, self.parked, self.park = self.parked, [], False
        for request in parked:
            if request._disconnected:
                continue
            if self.fail_parked:
                request.setResponseCode(503)
                request.setHeader(b"content-type", b"application/json")
                request.write(b'{"errors":[{"code":"UNAVAILABLE","message":"down"}]}')
                request.finish()
                continue
            body = self._answer(request)
            if body is not NOT_DONE_YET:
                request.write(body)
                request.finish()

    def release(self) -> None:
        held, self.held = self.held, []
        for request, rest in held:
            if not request._disconnected:
                request.write(rest)
                request.finish()


class Reader(Protocol):
    def __init__(self, hang_up: bool = False) -> None:
        self.data = b""
        self.hang_up = hang_up
        self.ended = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.hang_up:
            self.transport.stopProducing()

    def connectionLost(self, reason: object) -> None:
        self.ended = True


class SingleFetchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.data = os.urandom(300_000)
        self.digest = "sha256:" + hashlib.sha256(self.data).hexdigest()
        self.gate = Gate({self.digest: self.data})
        self.mirror = MemoryMirror(
            self,
            Path(tempfile.mkdtemp()),
            upstreams=("http://gate.test",),
            registries={"other.io": Registry("other.io", ("http://gate.test",))},
        )
        self.mirror.add_host(b"gate.test", self.gate)
        self.path = f"/v2/library/x/blobs/{self.digest}"

    def start(self, path: str | None = None, hang_up: bool = False) -> tuple[Deferred, Reader]:
        reader = Reader(hang_up)
        d = self.mirror.client.get(MIRROR + (path or self.path))
        d.addCallback(lambda response: (response.deliverBody(reader), response)[1])
        return d, reader

    def publish(self) -> None:
        self.mirror.settle()
        self.mirror.clock.advance(1)
        self.mirror.settle()

    def assert_hit_now(self) -> None:
        self.publish()
        reply = self.mirror.get(self.path)
        self.assertEqual((reply.code, reply.header("x-mirrord-cache")), (200, "HIT"))
        self.assertEqual(reply.body, self.data)

    def test_leader_leaving_before_headers(self) -> None:
        """The first client leaves while the upstream has not answered: the
        others follow the same fetch, which completes into the cache."""
        self.gate.park = True
        leader, _ = self.start()
        followers = [self.start() for _ in range(3)]
        self.mirror.settle()
        leader.cancel()
        self.mirror.settle()
        self.failureResultOf(leader)
        self.assertEqual(self.gate.gets, 1)
        self.gate.answer_parked()
        self.mirror.settle()
        for _, reader in followers:
            self.assertEqual(reader.data, self.data)
        self.assertEqual(self.gate.gets, 1)
        self.assert_hit_now()
        self.assertEqual(self.gate.gets, 1)

    def test_leader_leaving_before_headers_alone(self) -> None:
        """With nobody waiting, the fetch the leader started still completes,
        so the next request is a hit."""
        self.gate.park = True
        leader, _ = self.start()
        self.mirror.settle()
        leader.cancel()
        self.mirror.settle()
        self.failureResultOf(leader)
        self.gate.answer_parked()
        self.assert_hit_now()
        self.assertEqual(self.gate.gets, 1)

    def test_leader_leaving_mid_body(self) -> None:
        """The first client hangs up after its first bytes; the fill goes on."""
        self.gate.hold_at = 50_000
        _, quitter = self.start(hang_up=True)
        self.mirror.settle()
        followers = [self.start() for _ in range(3)]
        self.mirror.settle()
        self.gate.release()
        self.mirror.settle()
        self.assertTrue(quitter.ended)
        for _, reader in followers:
            self.assertEqual(reader.data, self.data)
        self.assert_hit_now()
        self.assertEqual(self.gate.gets, 1)

    def test_two_registries_share_one_fetch(self) -> None:
        """One digest asked for through two registries is fetched once."""
        self.gate.hold_at = 50_000
        _, hub = self.start()
        self.mirror.settle()
        _, other = self.start(f"/v2/other.io/x/blobs/{self.digest}")
        self.mirror.settle()
        self.gate.release()
        self.mirror.settle()
        self.assertEqual(hub.data, self.data)
        self.assertEqual(other.data, self.data)
        self.assertEqual(self.gate.gets, 1)

    def test_failed_start_is_retried_once(self) -> None:
        """The upstream fails the first GET: its client gets the 503, and of
        the three clients waiting on it exactly one tries again."""
        self.gate.park = True
        self.gate.fail_parked = True
        leader = self.mirror.client.get(MIRROR + self.path)
        followers = [self.start() for _ in range(3)]
        self.mirror.settle()
        self.gate.hold_at = 50_000  # the retry stays running while the others join
        self.gate.answer_parked()
        self.mirror.settle()
        self.assertEqual(self.successResultOf(leader).code, 503)
        self.gate.release()
        self.mirror.settle()
        for _, reader in followers:
            self.assertEqual(reader.data, self.data)
        self.assertEqual(self.gate.gets, 2)


class RefusedFollowerTests(SynchronousTestCase):
    """A follower the privacy rule turns away gets the upstream's answer
    to a HEAD and starts no fetch of its own."""

    def test_refused_follower_starts_no_fetch(self) -> None:
        mirror = MemoryMirror(self, Path(tempfile.mkdtemp()))
        hub = mirror.hub
        private = mirror.private
        blob = max(
            (d for d in private.blobs if d != private.manifest_digest),
            key=lambda d: private.blob_path(d).stat().st_size,
        )
        alice = mirror.pull_headers("alice/private", auth=("alice", "secret"))
        hub.cdn_hold_at = 10_000
        path = f"/v2/alice/private/blobs/{blob}"
        pending = mirror.client.get(MIRROR + path, headers=alice)
        mirror.settle()
        strangers = [
            mirror.get(path),
            mirror.get(path, mirror.pull_headers("library/alpine")),
        ]
        self.assertEqual([s.code for s in strangers], [401, 401])
        hub.release_cdn()
        mirror.settle()
        self.assertEqual(self.successResultOf(pending).code, 200)
        self.assertEqual(hub.counts["GET blobs"], 1)
        self.assertEqual(hub.counts["cdn GET"], 1)
