"""Fills that survive a cut (issue 10 items 6 and 7), in memory: an upstream
body that stops early is resumed with Range from the bytes the fill has,
clients following it see one body, and a client's own Range request of a
blob being filled is served from the fill."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mirrord.config import CacheConfig
from tests.support.memory import MIRROR, MemoryMirror

SIZE = 600_000


class Body(Protocol):
    """Collects a response body and how it ended."""

    def __init__(self) -> None:
        self.data = b""
        self.reason: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.reason = reason

    @property
    def whole(self) -> bool:
        return self.reason is not None and self.reason.check(ResponseDone) is not None


class ResumeTests(SynchronousTestCase):
    def setUp(self) -> None:
        tmp = Path(tempfile.mkdtemp())
        self.mirror = MemoryMirror(self, tmp)
        self.hub = self.mirror.hub
        self.data = os.urandom(SIZE)
        self.digest = "sha256:" + hashlib.sha256(self.data).hexdigest()
        blob = tmp / "blob"
        blob.write_bytes(self.data)
        self.hub.add_blob_file(self.digest, blob)
        self.path = f"/v2/library/alpine/blobs/{self.digest}"
        self.headers = self.mirror.pull_headers("library/alpine")
        self.hub.counts.clear()

    def start(self, extra: dict[str, str] | None = None) -> tuple[Any, Body]:
        """A client GET of the blob, its body collected as it comes."""
        body = Body()
        d = self.mirror.client.get(MIRROR + self.path, headers={**self.headers, **(extra or {})})
        d.addCallback(lambda response: (response.deliverBody(body), response)[1])
        return d, body

    def published(self) -> None:
        self.mirror.settle()
        self.mirror.clock.advance(1)
        self.mirror.settle()

    def test_cut_once_is_resumed_with_one_ranged_request(self) -> None:
        """A CDN that cuts once: the client gets the whole blob in one 200,
        it is cached (verified), and the CDN saw one ranged request."""
        self.hub.cdn_cut_at, self.hub.cdn_cuts = 200_000, 1
        d, body = self.start()
        self.mirror.settle()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertTrue(body.whole, body.reason)
        self.assertEqual(body.data, self.data)
        self.assertEqual((self.hub.counts["cdn GET"], self.hub.counts["cdn ranged"]), (2, 1))
        ranged = [h for m, _, h in self.hub.seen if "range" in h]
        self.assertEqual(ranged[0]["range"], ["bytes=200000-"])
        self.assertEqual(self.mirror.metrics.value("mirrord_fill_resumes_total"), 1)
        self.published()
        reply = self.mirror.get(self.path, self.headers)
        self.assertEqual((reply.header("x-mirrord-cache"), reply.body), ("HIT", self.data))
        self.assertEqual(self.hub.counts["cdn GET"], 2)

    def test_each_resume_asks_the_registry_for_a_fresh_url(self) -> None:
        """A resume asks the registry again (a new signed URL), with the first GET's credentials."""
        self.hub.cdn_cut_at, self.hub.cdn_cuts = 200_000, 1
        self.start()
        self.mirror.settle()
        registry = [h for m, u, h in self.hub.seen if m == "GET" and u.startswith("/v2/library")]
        self.assertEqual(len(registry), 2)
        self.assertEqual(registry[1].get("range"), ["bytes=200000-"])
        self.assertEqual(registry[1]["authorization"], registry[0]["authorization"])

    def test_refused_resume_is_asked_again(self) -> None:
        """A resume the CDN refuses (403, an expired signed URL) is tried
        again through the registry, and the client still gets the whole blob."""
        self.hub.cdn_cut_at, self.hub.cdn_cuts = 200_000, 1
        self.hub.cdn_refuse_ranged = 1
        d, body = self.start()
        self.mirror.settle()
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertTrue(body.whole, body.reason)
        self.assertEqual(body.data, self.data)
        self.assertEqual((self.hub.counts["cdn GET"], self.hub.counts["cdn ranged"]), (3, 2))
        registry = [u for m, u, _ in self.hub.seen if m == "GET" and u.startswith("/v2/library")]
        self.assertEqual(len(registry), 3)

    def test_cut_every_time_aborts_the_client_and_caches_nothing(self) -> None:
        """A CDN that always cuts: after resume_attempts resumes the client
        is cut off short, nothing is cached, and the next request starts afresh."""
        self.hub.cdn_cut_at, self.hub.cdn_cuts = 100_000, -1
        d, body = self.start()
        outcome: list[Any] = []
        d.addBoth(outcome.append)
        self.mirror.settle()
        # Aborted: before its headers (the fill failed first) or mid-body.
        self.assertEqual(len(outcome), 1)
        self.assertFalse(body.whole)
        self.assertLess(len(body.data), SIZE)
        self.assertEqual(self.hub.counts["cdn ranged"], self.mirror.config.cache.resume_attempts)
        self.published()
        self.assertIsNone(self.mirror.store.get(self.digest))
        self.hub.cdn_cut_at = None
        self.hub.counts.clear()
        reply = self.mirror.get(self.path, self.headers)
        self.assertEqual((reply.code, reply.header("x-mirrord-cache")), (200, "MISS"))
        self.assertEqual(reply.body, self.data)
        self.assertEqual((self.hub.counts["cdn GET"], self.hub.counts["cdn ranged"]), (1, 0))

    def test_two_followers_see_one_body(self) -> None:
        """Two clients following one cut fill both get the whole blob, from one resumed fill."""
        self.hub.cdn_cut_at, self.hub.cdn_cuts = 300_000, 1
        clients = [self.start(), self.start()]
        self.mirror.settle()
        for d, body in clients:
            self.assertEqual(self.successResultOf(d).code, 200)
            self.assertTrue(body.whole, body.reason)
            self.assertEqual(body.data, self.data)
        self.assertEqual((self.hub.counts["cdn GET"], self.hub.counts["cdn ranged"]), (2, 1))

    def test_stalled_upstream_is_resumed(self) -> None:
        """An upstream body quiet for body_idle is cut and resumed from where it stopped."""
        self.hub.cdn_hold_at = 100_000
        _, body = self.start()
        self.mirror.settle()
        self.assertLess(len(body.data), SIZE)
        self.mirror.clock.advance(self.mirror.config.timeouts.body_idle + 1)
        self.mirror.settle()
        self.assertEqual(self.hub.counts["cdn ranged"], 1)
        self.hub.cdn_hold_at = None
        self.hub.release_cdn()
        self.mirror.settle()
        self.assertTrue(body.whole, body.reason)
        self.assertEqual(body.data, self.data)

    def test_resumes_stop_at_fill_timeout(self) -> None:
        """Resumes are tried only within fill_timeout of the first cut, even
        with attempts left: then the client is cut off and nothing is cached."""
        mirror = MemoryMirror(
            self, Path(tempfile.mkdtemp()), cache=CacheConfig(tag_ttl=0, fill_timeout=100)
        )
        blob = Path(tempfile.mkdtemp()) / "blob"
        blob.write_bytes(self.data)
        mirror.hub.add_blob_file(self.digest, blob)
        headers = mirror.pull_headers("library/alpine")
        mirror.hub.cdn_hold_at = 100_000  # every body stalls after 100 kB
        body = Body()
        d = mirror.client.get(MIRROR + self.path, headers=headers)
        d.addCallback(lambda response: response.deliverBody(body))
        mirror.settle()
        for _ in range(4):
            mirror.clock.advance(mirror.config.timeouts.body_idle + 1)
            mirror.settle()
        # Cuts at 61 s (resume), 122 s (resume, 61 s after the first), 183 s (past 100 s: fail).
        self.assertEqual(mirror.hub.counts["cdn ranged"], 2)
        self.assertFalse(body.whole)
        self.assertIsNotNone(body.reason)
        self.assertIsNone(mirror.store.get(self.digest))

    def test_range_of_a_blob_being_filled_is_served_from_the_fill(self) -> None:
        """A client's Range request while the blob is being filled gets its
        206 from the fill, waiting for its first byte; the CDN sends the blob once."""
        self.hub.cdn_hold_at = 100_000
        _, first = self.start()
        self.mirror.settle()
        d, ranged = self.start({"Range": "bytes=300000-"})
        self.mirror.settle()
        self.assertNoResult(d)  # its first byte is not on disk yet
        self.hub.release_cdn()
        self.mirror.settle()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 206)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-range"),
            [f"bytes 300000-{SIZE - 1}/{SIZE}".encode()],
        )
        self.assertTrue(ranged.whole, ranged.reason)
        self.assertEqual(ranged.data, self.data[300_000:])
        self.assertEqual(first.data, self.data)
        self.assertEqual((self.hub.counts["cdn GET"], self.hub.counts["cdn ranged"]), (1, 0))

    def test_range_on_disk_does_not_wait_for_the_fill(self) -> None:
        """A Range request whose bytes are all on disk completes while the fill is still running."""
        self.hub.cdn_hold_at = 100_000
        self.start()
        self.mirror.settle()
        d, ranged = self.start({"Range": "bytes=1000-1999"})
        self.mirror.settle()
        self.assertEqual(self.successResultOf(d).code, 206)
        self.assertTrue(ranged.whole, ranged.reason)
        self.assertEqual(ranged.data, self.data[1000:2000])
        self.assertIsNone(self.mirror.store.get(self.digest))  # the fill is still held

    def test_head_of_a_blob_being_filled_answers_from_the_fill(self) -> None:
        """HEAD of a blob being filled gives its size without asking upstream."""
        self.hub.cdn_hold_at = 100_000
        self.start()
        self.mirror.settle()
        requests = self.hub.counts["requests"]
        reply = self.mirror.request("HEAD", self.path, self.headers)
        self.assertEqual((reply.code, reply.header("content-length")), (200, str(SIZE)))
        self.assertEqual(reply.header("docker-content-digest"), self.digest)
        self.assertEqual(self.hub.counts["requests"], requests)
        self.assertEqual(self.hub.counts["cdn HEAD"], 0)


class OddRanges(Resource):
    """An upstream (no CDN) that cuts its first body after ``cut_at`` bytes
    and answers a Range request with the whole blob (``mode="ignore"``) or
    with a range from the wrong offset (``mode="wrong"``)."""

    isLeaf = True

    def __init__(self, data: bytes, cut_at: int, mode: str) -> None:
        super().__init__()
        self.data, self.cut_at, self.mode = data, cut_at, mode
        self.gets: list[bytes | None] = []

    def render_GET(self, request: Request) -> bytes:
        spec = request.getHeader(b"range")
        self.gets.append(spec)
        request.setHeader(b"content-type", b"application/octet-stream")
        if spec is None or self.mode == "ignore":
            body = self.data
        else:
            first = int(spec[6:].split(b"-")[0]) - 1  # "wrong": one byte early
            body = self.data[first:]
            request.setResponseCode(206)
            request.setHeader(
                b"content-range", b"bytes %d-%d/%d" % (first, len(self.data) - 1, len(self.data))
            )
        request.setHeader(b"content-length", b"%d" % len(body))
        if len(self.gets) == 1:
            request.write(body[: self.cut_at])
            request.channel.transport.loseConnection()
            return NOT_DONE_YET
        return body


class OddUpstreamTests(SynchronousTestCase):
    def mirror(self, mode: str) -> tuple[MemoryMirror, OddRanges, bytes, str]:
        tmp = Path(tempfile.mkdtemp())
        mirror = MemoryMirror(self, tmp, upstreams=("http://odd.test",))
        data = os.urandom(SIZE)
        upstream = OddRanges(data, 250_000, mode)
        mirror.add_host(b"odd.test", upstream)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        return mirror, upstream, data, f"/v2/library/x/blobs/{digest}"

    def test_upstream_ignoring_range_still_completes_the_fill(self) -> None:
        """A resume answered 200 (Range ignored): the bytes already held are
        skipped and the client gets the blob once, whole."""
        mirror, upstream, data, path = self.mirror("ignore")
        reply = mirror.get(path)
        self.assertEqual((reply.code, reply.body), (200, data))
        self.assertEqual(upstream.gets, [None, b"bytes=250000-"])

    def test_range_from_the_wrong_offset_is_not_taken(self) -> None:
        """A 206 that does not start at the fill's offset is refused: each
        attempt fails and the client is cut short rather than given wrong bytes."""
        mirror, upstream, data, path = self.mirror("wrong")
        body = Body()
        d = mirror.client.get(MIRROR + path)
        d.addCallback(lambda response: response.deliverBody(body))
        d.addErrback(lambda _: None)
        mirror.settle()
        self.assertFalse(body.whole)
        self.assertEqual(body.data, data[: len(body.data)])
        self.assertEqual(len(upstream.gets), 1 + mirror.config.cache.resume_attempts)
