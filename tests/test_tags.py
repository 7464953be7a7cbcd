"""Fewer upstream round trips for tags: a tag revalidated within tag_ttl is
answered from the cache, and concurrent revalidations share one HEAD."""

from __future__ import annotations

import tempfile
from pathlib import Path

import treq
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.server import NOT_DONE_YET, Request

from mirrord.config import CacheConfig
from tests.support.images import OCI_MANIFEST
from tests.support.memory import MIRROR, MemoryMirror

ACCEPT = {"Accept": [OCI_MANIFEST]}
PATH = "/v2/library/alpine/manifests/latest"


class HeadGate(Resource):
    """Parks every HEAD until ``release``; everything else goes straight to ``upstream``."""

    isLeaf = True

    def __init__(self, upstream: Resource) -> None:
        super().__init__()
        self.upstream = upstream
        self.parked: list[Request] = []
        self.closed = True

    def render(self, request: Request) -> bytes | int:
        if request.method == b"HEAD" and self.closed:
            self.parked.append(request)
            return NOT_DONE_YET
        return getChildForRequest(self.upstream, request).render(request)

    def release(self) -> None:
        self.closed = False
        parked, self.parked = self.parked, []
        for request in parked:
            body = self.render(request)
            if body is not NOT_DONE_YET:
                request.write(body)
                request.finish()


class TagTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.mirror = MemoryMirror(self, Path(tempfile.mkdtemp()), cache=CacheConfig(tag_ttl=60))
        self.hub = self.mirror.hub

    def pull(self, auth: tuple[str, str] | None = None, name: str = "library/alpine"):
        headers = {**ACCEPT, **self.mirror.pull_headers(name, auth=auth)}
        return self.mirror.get(f"/v2/{name}/manifests/latest", headers)

    def test_tag_within_tag_ttl_asks_upstream_nothing(self) -> None:
        """The second pull within tag_ttl costs no upstream request; after it, one HEAD."""
        first = self.pull()
        self.assertEqual(first.header("x-mirrord-cache"), "MISS")
        heads, gets = self.hub.counts["HEAD manifests"], self.hub.counts["GET manifests"]
        second = self.pull()
        self.assertEqual((second.code, second.header("x-mirrord-cache")), (200, "HIT"))
        self.assertEqual(second.body, first.body)
        self.assertEqual(self.hub.counts["HEAD manifests"], heads)
        self.assertEqual(self.hub.counts["GET manifests"], gets)
        self.mirror.clock.advance(61)
        third = self.pull()
        self.assertEqual(third.header("x-mirrord-cache"), "HIT")
        self.assertEqual(self.hub.counts["HEAD manifests"], heads + 1)
        self.assertEqual(self.hub.counts["GET manifests"], gets)

    def test_cached_manifest_still_challenges_clients_without_credentials(self) -> None:
        """A manifest answered from the cache (by tag within tag_ttl, or by
        digest) is not sent to a client with no credentials at all: it gets
        the challenge for the mirror's /token, as before the cache had it."""
        first = self.pull()
        digest = first.header("docker-content-digest")
        for path in (
            "/v2/library/alpine/manifests/latest",
            f"/v2/library/alpine/manifests/{digest}",
        ):
            self.assertEqual(self.mirror.get(path, self.pull_auth()).code, 200)
            bare = self.mirror.get(path, ACCEPT)
            self.assertEqual(bare.code, 401, path)
            self.assertIn("mirror.test/token", bare.header("www-authenticate"))
            self.assertNotEqual(bare.body, first.body)

    def pull_auth(self) -> dict:
        return {**ACCEPT, **self.mirror.pull_headers("library/alpine")}

    def test_private_tag_within_tag_ttl_only_for_verified_clients(self) -> None:
        """A private tag answered from the cache within tag_ttl is still
        refused to a client the upstream has not accepted for it."""
        first = self.pull(("alice", "secret"), "alice/private")
        self.assertEqual(first.code, 200)
        again = self.pull(("alice", "secret"), "alice/private")
        self.assertEqual(again.header("x-mirrord-cache"), "HIT")
        stranger = self.pull(name="alice/private")
        self.assertEqual(stranger.code, 401)
        self.assertEqual(self.mirror.get("/v2/alice/private/manifests/latest").code, 401)

    def test_concurrent_revalidations_share_one_head(self) -> None:
        """32 clients, each with its own token, pulling a public tag at once
        after tag_ttl cause one HEAD upstream, and all get the manifest."""
        first = self.pull()
        self.mirror.clock.advance(61)
        gate = HeadGate(self.mirror.hosts.hosts[b"hub.test"])
        self.mirror.add_host(b"hub.test", gate)
        heads = self.hub.counts["HEAD manifests"]
        clients = [
            self.mirror.client.get(
                MIRROR + PATH, headers={**ACCEPT, **self.mirror.pull_headers("library/alpine")}
            )
            for _ in range(32)
        ]
        self.mirror.settle()
        self.assertEqual(len(gate.parked), 1)
        gate.release()
        self.mirror.settle()
        for d in clients:
            response = self.successResultOf(d)
            self.assertEqual(response.code, 200)
            self.assertEqual(self.successResultOf(treq.content(response)), first.body)
        self.assertEqual(self.hub.counts["HEAD manifests"], heads + 1)

    def test_tag_ttl_zero_asks_every_time(self) -> None:
        mirror = MemoryMirror(self, Path(tempfile.mkdtemp()), cache=CacheConfig(tag_ttl=0))
        headers = {**ACCEPT, **mirror.pull_headers("library/alpine")}
        mirror.get(PATH, headers)
        heads = mirror.hub.counts["HEAD manifests"]
        mirror.get(PATH, headers)
        self.assertEqual(mirror.hub.counts["HEAD manifests"], heads + 1)


class SharedHeadLengthTests(SynchronousTestCase):
    def test_heads_sharing_one_upstream_head_keep_the_true_length(self) -> None:
        """HEADs of an uncached tag that share one upstream HEAD each answer
        the manifest's true Content-Length (containerd fails on 0)."""
        mirror = MemoryMirror(self, Path(tempfile.mkdtemp()), cache=CacheConfig(tag_ttl=0))
        gate = HeadGate(mirror.hosts.hosts[b"hub.test"])
        mirror.add_host(b"hub.test", gate)
        heads = [
            mirror.client.request(
                "HEAD",
                MIRROR + PATH,
                headers={**ACCEPT, **mirror.pull_headers("library/alpine")},
            )
            for _ in range(3)
        ]
        mirror.settle()
        self.assertEqual(len(gate.parked), 1)
        gate.release()
        mirror.settle()
        manifest = mirror.alpine.blobs[mirror.alpine.manifest_digest]
        for d in heads:
            response = self.successResultOf(d)
            self.assertEqual(response.code, 200)
            self.assertEqual(
                response.headers.getRawHeaders(b"content-length"), [str(len(manifest)).encode()]
            )
