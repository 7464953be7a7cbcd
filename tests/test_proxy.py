"""The /v2/ proxy in memory: real resource tree, real Agent, fake Hubs."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mirrord.config import Timeouts
from tests.support.images import OCI_MANIFEST
from tests.support.memory import MemoryMirror

ACCEPT = {"Accept": [OCI_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json"]}


class ProxyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp())
        self.mirror = MemoryMirror(self, self.tmp)

    def auth(self, name: str = "library/alpine", **kw) -> dict:
        return {**ACCEPT, **self.mirror.pull_headers(name, **kw)}

    def test_challenge_points_at_mirror_token_endpoint(self) -> None:
        """An anonymous /v2/ probe gets the upstream's challenge with the realm rewritten to us."""
        reply = self.mirror.get("/v2/")
        self.assertEqual(reply.code, 401)
        self.assertEqual(
            reply.header("www-authenticate"),
            'Bearer realm="https://mirror.test/token",service="fakehub"',
        )
        self.assertEqual(reply.header("docker-distribution-api-version"), "registry/2.0")

    def test_manifest_by_tag_through_token_flow(self) -> None:
        """A one-component name is served as library/<name>, byte-exact, with its headers."""
        reply = self.mirror.get("/v2/alpine/manifests/latest", self.auth())
        self.assertEqual(reply.code, 200, reply.body)
        digest = self.mirror.alpine.manifest_digest
        self.assertEqual("sha256:" + hashlib.sha256(reply.body).hexdigest(), digest)
        self.assertEqual(reply.header("docker-content-digest"), digest)
        self.assertEqual(reply.header("content-type"), OCI_MANIFEST)
        self.assertEqual(reply.length, len(reply.body))
        self.assertEqual(reply.header("ratelimit-remaining"), "99;w=21600")
        gets = [(p, h) for m, p, h in self.mirror.hub.seen if m == "GET" and "manifests" in p]
        path, headers = gets[-1]
        self.assertEqual(path, "/v2/library/alpine/manifests/latest")
        self.assertEqual(headers["accept"], ACCEPT["Accept"])
        self.assertEqual(headers["x-forwarded-proto"], ["https"])
        self.assertEqual(headers["x-real-ip"], ["127.0.0.1"])
        self.assertNotIn("accept-encoding", headers)

    def test_head_stays_head(self) -> None:
        """A HEAD is sent upstream as HEAD (free on Hub) and answers the true length."""
        headers = self.auth()
        reply = self.mirror.request("HEAD", "/v2/library/alpine/manifests/latest", headers)
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.body, b"")
        manifest = self.mirror.alpine.blobs[self.mirror.alpine.manifest_digest]
        self.assertEqual(reply.header("content-length"), str(len(manifest)))
        self.assertEqual(self.mirror.hub.counts["GET manifests"], 0)
        self.assertEqual(self.mirror.hub.counts["HEAD manifests"], 1)

    def test_blob_follows_cdn_redirect_without_credentials(self) -> None:
        """A blob's 307 to the CDN is followed by the mirror and the token stays behind."""
        digest, data = max(self.mirror.alpine.blobs.items(), key=lambda kv: len(kv[1]))
        reply = self.mirror.get(f"/v2/alpine/blobs/{digest}", self.auth())
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.body, data)
        self.assertEqual(reply.length, len(data))
        cdn = [
            h for m, p, h in self.mirror.hub.seen if p.startswith("/registry-v2/") and m == "GET"
        ]
        self.assertEqual(len(cdn), 1)
        self.assertNotIn("authorization", cdn[0])
        self.assertEqual(self.mirror.hub.counts["cdn rejected auth"], 0)

    def test_range_is_forwarded(self) -> None:
        """A Range request on a blob gets the CDN's 206 and exactly those bytes."""
        digest, data = next(iter(self.mirror.alpine.blobs.items()))
        headers = {**self.auth(), "Range": "bytes=10-29"}
        reply = self.mirror.get(f"/v2/alpine/blobs/{digest}", headers)
        self.assertEqual(reply.code, 206)
        self.assertEqual(reply.body, data[10:30])
        self.assertEqual(reply.header("content-range"), f"bytes 10-29/{len(data)}")

    def test_missing_tag_is_manifest_unknown(self) -> None:
        """A tag that does not exist is a clean 404 MANIFEST_UNKNOWN."""
        reply = self.mirror.get("/v2/alpine/manifests/nope", self.auth())
        self.assertEqual(reply.code, 404)
        self.assertEqual(reply.json()["errors"][0]["code"], "MANIFEST_UNKNOWN")

    def test_private_repository_needs_credentials(self) -> None:
        """A private repository is served with the user's token and refused without one."""
        anonymous = self.mirror.get(
            "/v2/alice/private/manifests/latest", self.auth("alice/private")
        )
        self.assertEqual(anonymous.code, 401)
        headers = self.auth("alice/private", auth=("alice", "secret"))
        reply = self.mirror.get("/v2/alice/private/manifests/latest", headers)
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.header("docker-content-digest"), self.mirror.private.manifest_digest)

    def test_token_forwards_every_scope(self) -> None:
        """All scope parameters reach the realm, with library/ added for official images."""
        self.mirror.get("/v2/")
        reply = self.mirror.get(
            "/token?service=fakehub&scope=repository:alpine:pull&scope=repository:alice/private:pull",
            auth=("alice", "secret"),
        )
        self.assertEqual(reply.code, 200)
        self.assertEqual(self.mirror.hub.counts["token-scopes"], 2)
        token = reply.json()["token"]
        ok = self.mirror.get(
            "/v2/alice/private/manifests/latest", {"Authorization": f"Bearer {token}"}
        )
        self.assertEqual(ok.code, 200)
        ok = self.mirror.get("/v2/alpine/manifests/latest", {"Authorization": f"Bearer {token}"})
        self.assertEqual(ok.code, 200)

    def test_token_post_form(self) -> None:
        """The OAuth2 password form (docker login) is relayed to the realm."""
        self.mirror.get("/v2/")
        reply = self.mirror.request(
            "POST",
            "/token",
            data={
                "grant_type": "password",
                "username": "alice",
                "password": "secret",
                "service": "fakehub",
                "scope": "repository:alice/private:pull",
            },
        )
        self.assertEqual(reply.code, 200, reply.body)
        self.assertIn("access_token", reply.json())

    def test_token_for_unknown_service_is_refused(self) -> None:
        """The mirror relays credentials only to realms its upstreams announced."""
        reply = self.mirror.get("/token?service=evil.example&scope=x", auth=("alice", "secret"))
        self.assertEqual(reply.code, 403)
        self.assertEqual(reply.json()["errors"][0]["code"], "DENIED")

    def test_token_discovers_realm_after_restart(self) -> None:
        """A token request with credentials before any challenge was relayed
        still finds the realm."""
        reply = self.mirror.get(
            "/token?service=fakehub&scope=repository:alpine:pull", auth=("alice", "secret")
        )
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual(self.mirror.hub.counts["token"], 1)
        self.assertEqual(self.mirror.hub.counts["GET base"], 1)


class BadInputTests(SynchronousTestCase):
    """Bad requests get registry JSON errors and never reach upstream."""

    def setUp(self) -> None:
        self.mirror = MemoryMirror(self, Path(tempfile.mkdtemp()))

    def assertRefused(self, reply, status: int, code: str) -> None:
        self.assertEqual(reply.code, status, reply.body)
        self.assertEqual(reply.header("content-type"), "application/json")
        self.assertEqual(reply.json()["errors"][0]["code"], code)
        self.assertEqual(self.mirror.hub.counts["requests"], 0)

    def test_post_is_unsupported(self) -> None:
        reply = self.mirror.request("POST", "/v2/library/alpine/blobs/uploads/")
        self.assertRefused(reply, 405, "UNSUPPORTED")
        self.assertEqual(reply.header("allow"), "GET, HEAD")

    def test_delete_is_unsupported(self) -> None:
        reply = self.mirror.request("DELETE", "/v2/library/alpine/manifests/latest")
        self.assertRefused(reply, 405, "UNSUPPORTED")

    def test_invalid_names(self) -> None:
        for path in (
            "/v2/Library/alpine/manifests/latest",
            "/v2/library/../etc/manifests/latest",
            "/v2/library%2Falpine/manifests/latest",
            "/v2/-bad/manifests/latest",
            "/v2/" + "a/" * 200 + "manifests/latest",
        ):
            with self.subTest(path=path):
                self.assertRefused(self.mirror.get(path), 400, "NAME_INVALID")

    def test_malformed_digests(self) -> None:
        for path in (
            "/v2/library/alpine/manifests/sha256:ZZ",
            "/v2/library/alpine/blobs/sha256:" + "A" * 64,
            "/v2/library/alpine/blobs/latest",
            "/v2/library/alpine/blobs/md5:" + "a" * 32,
        ):
            with self.subTest(path=path):
                self.assertRefused(self.mirror.get(path), 400, "DIGEST_INVALID")

    def test_invalid_tag(self) -> None:
        self.assertRefused(self.mirror.get("/v2/library/alpine/manifests/.bad"), 400, "TAG_INVALID")

    def test_unknown_endpoint(self) -> None:
        self.assertRefused(self.mirror.get("/v2/_catalog"), 404, "NAME_UNKNOWN")
        self.assertRefused(self.mirror.get("/nothing/here"), 404, "NAME_UNKNOWN")

    def test_unsatisfiable_range(self) -> None:
        digest = "sha256:" + "a" * 64
        for value in ("bytes=5-1", "bytes=1-2,4-5", "items=0-1", "bytes=x-"):
            with self.subTest(range=value):
                reply = self.mirror.get(f"/v2/library/alpine/blobs/{digest}", {"Range": value})
                self.assertRefused(reply, 416, "RANGE_INVALID")


class FailoverTests(SynchronousTestCase):
    """The upstream chain: 429s, outages and hangs."""

    def setUp(self) -> None:
        self.mirror = MemoryMirror(
            self,
            Path(tempfile.mkdtemp()),
            upstreams=("http://hub.test", "http://second.test"),
            timeouts=Timeouts(response=5.0),
            cache=None,  # the chain alone; tests/test_cache.py covers it with the cache
        )

    def manifest(self) -> object:
        return self.mirror.get(
            "/v2/alpine/manifests/latest", {**ACCEPT, **self.mirror.pull_headers("library/alpine")}
        )

    def test_429_falls_back_and_remembers(self) -> None:
        """After a 429 the next upstream answers, and the limited one rests until Retry-After."""
        hub = self.mirror.hub
        hub.ratelimit, hub.retry_after = True, 120
        reply = self.manifest()
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.header("docker-content-digest"), self.mirror.alpine.manifest_digest)
        self.assertEqual(hub.counts["429"], 1)
        self.assertEqual(self.mirror.second.counts["GET manifests"], 1)
        before = hub.counts["requests"]
        self.assertEqual(self.manifest().code, 200)
        self.assertEqual(hub.counts["requests"], before, "a resting upstream was asked")
        self.mirror.clock.advance(121)
        hub.ratelimit = False
        self.assertEqual(self.manifest().code, 200)
        self.assertEqual(hub.counts["GET manifests"], 2)

    def test_every_upstream_429_passes_the_last_answer(self) -> None:
        """With the whole chain limited the client sees Hub's 429 body and Retry-After."""
        for state in (self.mirror.hub, self.mirror.second):
            state.ratelimit, state.retry_after = True, 30
        reply = self.manifest()
        self.assertEqual(reply.code, 429)
        self.assertEqual(reply.json()["errors"][0]["code"], "TOOMANYREQUESTS")
        self.assertEqual(reply.header("retry-after"), "30")
        again = self.manifest()
        self.assertEqual(again.code, 429)
        self.assertEqual(again.json()["errors"][0]["code"], "TOOMANYREQUESTS")
        self.assertEqual(int(again.header("retry-after")), 30)

    def test_outage_falls_back(self) -> None:
        """A 503 from the primary sends the request to the next upstream."""
        self.mirror.hub.outage = True
        reply = self.mirror.get("/v2/alpine/manifests/latest", ACCEPT)
        self.assertEqual(reply.code, 200)
        self.assertEqual(self.mirror.second.counts["GET manifests"], 1)

    def test_hanging_upstreams_time_out(self) -> None:
        """Upstreams that never answer give 504 UNAVAILABLE within the response timeout."""
        self.mirror.hub.hang = self.mirror.second.hang = True
        d = self.mirror.client.get("https://mirror.test/v2/alpine/manifests/latest")
        self.mirror.settle()
        self.assertNoResult(d)
        self.mirror.clock.advance(5)
        self.mirror.settle()
        self.mirror.clock.advance(5)
        self.mirror.settle()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 504)
        body = self.successResultOf(response.json())
        self.assertEqual(body["errors"][0]["code"], "UNAVAILABLE")
