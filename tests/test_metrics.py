"""/metrics tells the truth with the cache on or off: every request kind,
/token, and body bytes by source as they are written (a transfer cut
short counts what was sent)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SynchronousTestCase

from mirrord.config import CacheConfig
from tests.support.blobs import PacedBlobs
from tests.support.images import OCI_MANIFEST
from tests.support.memory import MIRROR, MemoryMirror

ACCEPT = {"Accept": [OCI_MANIFEST]}


class HangUpAfterFirstChunk(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.transport.stopProducing()


class MetricsTests(SynchronousTestCase):
    def mirror(self, cache: bool) -> MemoryMirror:
        return MemoryMirror(
            self,
            Path(tempfile.mkdtemp()),
            cache=CacheConfig() if cache else None,
        )

    def served(self, mirror: MemoryMirror, source: str) -> float:
        return mirror.metrics.value("mirrord_served_bytes_total", source=source)

    def test_pass_through_counts_requests_and_bytes(self) -> None:
        """With the cache off, requests by kind and upstream bytes are counted exactly."""
        mirror = self.mirror(cache=False)
        headers = {**ACCEPT, **mirror.pull_headers("library/alpine")}
        token_bytes = self.served(mirror, "upstream")
        self.assertGreater(token_bytes, 0)  # the token's body came from upstream
        manifest = mirror.get("/v2/library/alpine/manifests/latest", headers)
        blob = next(d for d in mirror.alpine.blobs if d != mirror.alpine.manifest_digest)
        body = mirror.get(f"/v2/library/alpine/blobs/{blob}", headers)
        self.assertEqual(body.code, 200)
        self.assertEqual(
            self.served(mirror, "upstream"),
            token_bytes + len(manifest.body) + len(body.body),
        )
        self.assertEqual(self.served(mirror, "cache"), 0)
        value = mirror.metrics.value
        self.assertEqual(value("mirrord_requests_total", kind="manifests"), 1)
        self.assertEqual(value("mirrord_requests_total", kind="blobs"), 1)
        self.assertEqual(value("mirrord_requests_total", kind="token"), 1)
        self.assertEqual(value("mirrord_requests_total", kind="base"), 1)

    def test_bytes_by_source_with_the_cache(self) -> None:
        """A miss counts as upstream bytes, the same blob's hit as cache bytes."""
        mirror = self.mirror(cache=True)
        headers = {**ACCEPT, **mirror.pull_headers("library/alpine")}
        before = self.served(mirror, "upstream")
        blob = next(d for d in mirror.alpine.blobs if d != mirror.alpine.manifest_digest)
        path = f"/v2/library/alpine/blobs/{blob}"
        miss = mirror.get(path, headers)
        mirror.clock.advance(1)
        hit = mirror.get(path, headers)
        self.assertEqual(hit.header("x-mirrord-cache"), "HIT")
        self.assertEqual(self.served(mirror, "upstream") - before, len(miss.body))
        self.assertEqual(self.served(mirror, "cache"), len(hit.body))
        head = mirror.request("HEAD", path, headers)
        self.assertEqual(head.code, 200)
        self.assertEqual(self.served(mirror, "cache"), len(hit.body))

    def test_partial_send_counts_what_was_sent(self) -> None:
        """A client that leaves mid-transfer counts the bytes it was sent,
        with the cache on (a fill) and off (the relay)."""
        for cache in (True, False):
            with self.subTest(cache=cache):
                mirror = self.mirror(cache)
                data = os.urandom(400_000)
                digest = "sha256:" + hashlib.sha256(data).hexdigest()
                gate = PacedBlobs({digest: data})
                gate.hold_at = 150_000
                mirror.add_host(b"gate.test", gate)
                mirror.wiring.targets["docker.io"].chain.set_urls(["http://gate.test"])
                reader = HangUpAfterFirstChunk()
                d = mirror.client.get(MIRROR + f"/v2/library/x/blobs/{digest}")
                d.addCallback(lambda response, r=reader: response.deliverBody(r))
                mirror.settle()
                self.assertGreater(len(reader.data), 0)
                self.assertLess(len(reader.data), len(data))
                sent = self.served(mirror, "upstream")
                self.assertGreater(sent, 0)
                self.assertLessEqual(sent, gate.hold_at)
                gate.release()
                mirror.settle()
                self.assertEqual(self.served(mirror, "upstream"), sent)

    def test_rate_limits_and_fallbacks(self) -> None:
        """A 429 upstream is counted, and so is the fallback that answered."""
        mirror = MemoryMirror(
            self,
            Path(tempfile.mkdtemp()),
            upstreams=("http://hub.test", "http://second.test"),
            cache=None,
        )
        mirror.hub.ratelimit = True
        headers = {**ACCEPT, **mirror.pull_headers("library/alpine")}
        reply = mirror.get("/v2/library/alpine/manifests/latest", headers)
        self.assertEqual(reply.code, 200)
        value = mirror.metrics.value
        self.assertEqual(
            value("mirrord_upstream_rate_limited_total", upstream="http://hub.test"), 1
        )
        self.assertEqual(value("mirrord_upstream_fallbacks_total"), 1)
