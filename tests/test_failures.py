"""Failures are answered, never leaked: a disk that refuses a fill, a tag
record that cannot be written, a manifest that is not a JSON object, a
blob evicted mid-request, an upstream asking for an absurd rest."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Callable
from email.utils import formatdate
from pathlib import Path

import treq
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.server import Request

from mirrord.config import CacheConfig
from tests.support.images import OCI_MANIFEST
from tests.support.memory import MemoryMirror

ACCEPT = {"Accept": [OCI_MANIFEST]}


class Events:
    """Every log event while a test runs."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.seen: list[dict] = []
        globalLogPublisher.addObserver(self.seen.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.seen.append)

    def matching(self, text: str) -> list[dict]:
        return [e for e in self.seen if text in e.get("log_format", "")]

    def failures(self) -> list[dict]:
        return [e for e in self.seen if "log_failure" in e]


class OddManifests(Resource):
    """An upstream whose manifests are what the test says, with no Content-Type."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render(self, request: Request) -> bytes:
        request.defaultContentType = None
        request.setHeader(b"docker-content-digest", _digest(self.body).encode())
        return self.body


class BeforeHead(Resource):
    """Runs ``action`` when a HEAD arrives, then lets ``upstream`` answer it."""

    isLeaf = True

    def __init__(self, upstream: Resource, action: Callable[[], None]) -> None:
        super().__init__()
        self.upstream = upstream
        self.action = action

    def render(self, request: Request) -> bytes | int:
        if request.method == b"HEAD":
            self.action()
        return getChildForRequest(self.upstream, request).render(request)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FailureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp())
        self.events = Events(self)

    def mirror(self, **kwargs) -> MemoryMirror:
        return MemoryMirror(self, self.tmp, **kwargs)

    def test_full_disk_at_fill_start_passes_the_blob_through(self) -> None:
        """No space (or no descriptor) for a fill: the client gets the right
        bytes, nothing is cached, and the log says why once."""
        for code in (errno.ENOSPC, errno.EMFILE):
            with self.subTest(error=errno.errorcode[code]):
                mirror = MemoryMirror(self, Path(tempfile.mkdtemp()))
                self.events.seen.clear()

                def refuse(*_: object, code: int = code) -> None:
                    raise OSError(code, "refused by the test")

                mirror.store.new_temp = refuse
                headers = mirror.pull_headers("library/alpine")
                blob = next(d for d in mirror.alpine.blobs if d != mirror.alpine.manifest_digest)
                reply = mirror.get(f"/v2/library/alpine/blobs/{blob}", headers)
                self.assertEqual(reply.code, 200)
                self.assertEqual(_digest(reply.body), blob)
                self.assertEqual(reply.header("x-mirrord-cache"), "MISS")
                mirror.clock.advance(1)
                self.assertIsNone(mirror.store.get(blob))
                self.assertEqual(len(self.events.matching("not caching")), 1)
                self.assertEqual(self.events.failures(), [])

    def test_tag_record_that_cannot_be_written_is_still_served(self) -> None:
        """A tag record the disk refuses never turns a pull into an error:
        the first pull is a MISS, the second a HIT."""
        mirror = self.mirror()
        (mirror.store.root / "tags").write_bytes(b"not a directory")
        headers = {**ACCEPT, **mirror.pull_headers("library/alpine")}
        path = "/v2/library/alpine/manifests/latest"
        first = mirror.get(path, headers)
        second = mirror.get(path, headers)
        self.assertEqual((first.code, first.header("x-mirrord-cache")), (200, "MISS"))
        self.assertEqual((second.code, second.header("x-mirrord-cache")), (200, "HIT"))
        self.assertEqual(second.body, first.body)
        self.assertEqual(self.events.failures(), [])

    def test_manifest_that_is_not_a_json_object(self) -> None:
        """A manifest with no Content-Type whose body is not a JSON object
        is a registry error, not a traceback."""
        for body in (b"[1, 2, 3]", b"not json at all", b'"a string"'):
            with self.subTest(body=body):
                mirror = MemoryMirror(
                    self, Path(tempfile.mkdtemp()), upstreams=("http://odd.test",)
                )
                mirror.add_host(b"odd.test", OddManifests(body))
                self.events.seen.clear()
                reply = mirror.get(f"/v2/library/x/manifests/{_digest(body)}", ACCEPT)
                self.assertEqual(reply.code, 502)
                self.assertEqual(reply.json()["errors"][0]["code"], "MANIFEST_INVALID")
                self.assertEqual(self.events.failures(), [])

    def test_manifest_object_without_content_type_takes_its_media_type(self) -> None:
        """A JSON object with no Content-Type is served with its own mediaType."""
        body = b'{"schemaVersion": 2, "mediaType": "%s"}' % OCI_MANIFEST.encode()
        mirror = self.mirror(upstreams=("http://odd.test",))
        mirror.add_host(b"odd.test", OddManifests(body))
        reply = mirror.get(f"/v2/library/x/manifests/{_digest(body)}", ACCEPT)
        self.assertEqual((reply.code, reply.header("content-type")), (200, OCI_MANIFEST))

    def test_blob_evicted_during_the_privacy_check_is_a_miss(self) -> None:
        """A private blob evicted while its reader's credentials were being
        checked upstream is fetched again, not a 502."""
        mirror = self.mirror(cache=CacheConfig(auth_ttl=300))
        private = mirror.private
        blob = next(d for d in private.blobs if d != private.manifest_digest)
        path = f"/v2/alice/private/blobs/{blob}"
        alice = mirror.pull_headers("alice/private", auth=("alice", "secret"))
        self.assertEqual(mirror.get(path, alice).code, 200)
        mirror.clock.advance(301)  # verification expired: the next read asks upstream
        evicted: list[str] = []

        def evict() -> None:
            size, mirror.store.max_size = mirror.store.max_size, 0
            evicted.extend(mirror.store.evict())
            mirror.store.max_size = size

        hub = mirror.hosts.hosts[b"hub.test"]
        mirror.add_host(b"hub.test", BeforeHead(hub, evict))
        d = mirror.client.get("https://mirror.test" + path, headers=alice)
        mirror.settle()
        self.assertIn(blob, evicted)
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"x-mirrord-cache"), [b"MISS"])
        body = self.successResultOf(treq.content(response))
        self.assertEqual(_digest(body), blob)


class RetryAfterTests(SynchronousTestCase):
    """An upstream's Retry-After, on the injected clock, at most an hour."""

    def setUp(self) -> None:
        self.mirror = MemoryMirror(
            self,
            Path(tempfile.mkdtemp()),
            upstreams=("http://hub.test", "http://second.test"),
            cache=None,
        )
        self.hub = self.mirror.hub
        self.hub.ratelimit = True

    def pull(self) -> None:
        headers = {**ACCEPT, **self.mirror.pull_headers("library/alpine")}
        reply = self.mirror.get("/v2/library/alpine/manifests/latest", headers)
        self.assertEqual(reply.code, 200)

    def test_absurd_retry_after_is_capped_at_an_hour(self) -> None:
        self.hub.retry_after = 10 * 365 * 86400
        self.pull()
        self.assertEqual(self.hub.counts["429"], 1)
        self.mirror.clock.advance(3500)
        self.pull()
        self.assertEqual(self.hub.counts["429"], 1)  # still resting
        self.mirror.clock.advance(101)
        self.pull()
        self.assertEqual(self.hub.counts["429"], 2)  # asked again after an hour

    def test_http_date_is_measured_on_the_injected_clock(self) -> None:
        start = 1_000_000_000.0
        self.mirror.clock.advance(start)
        self.hub.retry_after = formatdate(start + 120, usegmt=True)
        self.pull()
        self.assertEqual(self.hub.counts["429"], 1)
        self.mirror.clock.advance(100)
        self.pull()
        self.assertEqual(self.hub.counts["429"], 1)
        self.mirror.clock.advance(21)
        self.pull()
        self.assertEqual(self.hub.counts["429"], 2)


class DiskWorkOffTheReactorTests(SynchronousTestCase):
    """A manifest's file, its tag's record and a blob's settled metadata are
    written (and fsynced) through the disk worker, never on the reactor."""

    def test_manifest_tag_and_meta_writes_go_through_the_worker(self) -> None:
        from mirrord.store import disk
        from mirrord.store.worker import InlineHasher

        state = {"inside": False}
        ran: list[str] = []
        outside: list[str] = []

        class Recording(InlineHasher):
            def run(self, f, *args):
                ran.append(getattr(f, "__name__", repr(f)))
                state["inside"] = True
                try:
                    return super().run(f, *args)
                finally:
                    state["inside"] = False

        real_write = disk._write_atomically

        def guarded(path, data):
            if not state["inside"]:
                outside.append(str(path))
            return real_write(path, data)

        self.patch(disk, "_write_atomically", guarded)
        mirror = MemoryMirror(
            self, Path(tempfile.mkdtemp()), hashers=Recording, cache=CacheConfig(tag_ttl=0)
        )
        alice = {**ACCEPT, **mirror.pull_headers("alice/private", auth=("alice", "secret"))}
        self.assertEqual(mirror.get("/v2/alice/private/manifests/latest", alice).code, 200)
        blob = next(d for d in mirror.private.blobs if d != mirror.private.manifest_digest)
        self.assertEqual(mirror.get(f"/v2/alice/private/blobs/{blob}", alice).code, 200)
        mirror.clock.advance(1)
        self.assertIn("write_bytes", ran)  # the manifest
        self.assertIn("write_tag_file", ran)  # its tag
        self.assertEqual(outside, [])


class DiskFullMidFillTests(SynchronousTestCase):
    def test_client_gets_the_rest_from_upstream_when_the_disk_fills(self) -> None:
        """The disk fills up mid-fill: the client still gets the whole, right
        blob (the rest passed through with one ranged request), nothing is
        cached, and the log says why once."""
        events = Events(self)
        mirror = MemoryMirror(self, Path(tempfile.mkdtemp()))
        layers = [d for d in mirror.alpine.blobs if d != mirror.alpine.manifest_digest]
        blob = max(layers, key=lambda d: len(mirror.alpine.blobs[d]))
        headers = mirror.pull_headers("library/alpine")
        mirror.hub.cdn_hold_at = 10_000
        pending = mirror.client.get(
            "https://mirror.test" + f"/v2/library/alpine/blobs/{blob}", headers=headers
        )
        mirror.settle()
        fill = mirror.wiring.in_flight.get(blob)
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fill.temp._fd)  # no space left from now on
        os.close(full)
        mirror.hub.cdn_hold_at = None
        mirror.hub.release_cdn()
        mirror.settle()
        response = self.successResultOf(pending)
        self.assertEqual(response.code, 200)
        body = self.successResultOf(treq.content(response))
        self.assertEqual(_digest(body), blob)
        mirror.clock.advance(1)
        self.assertIsNone(mirror.store.get(blob))
        ranged = [s for s in mirror.hub.seen if s[0] == "GET" and "range" in s[2]]
        self.assertEqual(len(ranged), 2)  # the registry's GET and its CDN redirect
        self.assertEqual(len(events.matching("fill of {digest} stopped")), 1)
        self.assertEqual(events.failures(), [])


class NoDescriptorForAHitTests(SynchronousTestCase):
    def test_hit_that_cannot_be_opened_is_passed_through(self) -> None:
        """No free descriptor to open a cached blob: the client still gets
        the right bytes, from upstream."""
        mirror = MemoryMirror(self, Path(tempfile.mkdtemp()))
        headers = mirror.pull_headers("library/alpine")
        blob = next(d for d in mirror.alpine.blobs if d != mirror.alpine.manifest_digest)
        path = f"/v2/library/alpine/blobs/{blob}"
        self.assertEqual(mirror.get(path, headers).code, 200)
        mirror.clock.advance(1)
        self.assertIsNotNone(mirror.store.get(blob))
        real_open = os.open

        def no_descriptors(name, *args, **kwargs):
            if "/cache/blobs/" in str(name):
                raise OSError(errno.EMFILE, "Too many open files")
            return real_open(name, *args, **kwargs)

        self.patch(os, "open", no_descriptors)
        cdn = mirror.hub.counts["cdn GET"]
        reply = mirror.get(path, headers)
        self.assertEqual(reply.code, 200)
        self.assertEqual(_digest(reply.body), blob)
        self.assertEqual(mirror.hub.counts["cdn GET"], cdn + 1)
