"""Private content stays private across repositories and registries: a
client accepted for one repository cannot read another's cached content by
asking for its digest under a path it may read."""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mirrord.config import CacheConfig, Registry
from tests.support import images
from tests.support.images import OCI_MANIFEST
from tests.support.memory import MemoryMirror

ACCEPT = {"Accept": [OCI_MANIFEST]}
ALICE = ("alice", "secret")
BOB = ("bob", "hunter2")


class CrossRepositoryTests(SynchronousTestCase):
    """alice/private and bob/secret are private; library/alpine is public."""

    def setUp(self) -> None:
        tmp = Path(tempfile.mkdtemp())
        self.mirror = MemoryMirror(
            self,
            tmp,
            cache=CacheConfig(stale_max_age=3600, auth_ttl=300),
            registries={
                # A second registry whose (public) repository has the same
                # name as alice's private one on Docker Hub.
                "other.io": Registry("other.io", ("http://second.test",)),
            },
        )
        self.hub = self.mirror.hub
        self.hub.users["bob"] = BOB[1]
        self.hub.add("bob/secret", images.single_arch(tmp / "bob", layer_sizes=(30_000,)))
        self.hub.private.add("bob/secret")
        self.mirror.second.add("alice/private", images.single_arch(tmp / "other"))
        private = self.mirror.private
        self.private_manifest = private.manifest_digest
        self.private_blob = max(
            (d for d in private.blobs if d != private.manifest_digest),
            key=lambda d: private.blob_path(d).stat().st_size,
        )
        self.private_bytes = private.blob_path(self.private_blob).read_bytes()

    def headers_for(self, name: str, auth: tuple[str, str] | None = None) -> dict:
        """A client that has just pulled ``name``'s tag (so the upstream accepted it there)."""
        headers = {**ACCEPT, **self.mirror.pull_headers(name, auth=auth)}
        reply = self.mirror.get(f"/v2/{name}/manifests/latest", headers)
        self.assertEqual(reply.code, 200, reply.body)
        return headers

    def alice_caches(self) -> dict:
        """alice pulls her private manifest and layer; both are published."""
        alice = self.headers_for("alice/private", ALICE)
        blob = self.mirror.get(f"/v2/alice/private/blobs/{self.private_blob}", alice)
        self.assertEqual(blob.body, self.private_bytes)
        self.mirror.clock.advance(1)  # the fill publishes
        self.assertIsNotNone(self.mirror.store.get(self.private_blob))
        self.assertIsNotNone(self.mirror.store.get(self.private_manifest))
        return alice

    def assert_refused(self, reply, code: int, error: str) -> None:
        self.assertEqual(reply.code, code, reply.body)
        self.assertNotEqual(reply.header("x-mirrord-cache"), "HIT")
        if reply.body:
            self.assertEqual(reply.json()["errors"][0]["code"], error)
            self.assertNotIn(self.private_bytes[:64], reply.body)

    def test_public_client_cannot_read_private_digest_under_a_public_name(self) -> None:
        """A client that pulled library/alpine gets the upstream's 404 for alice's
        cached private blob and manifest asked for under library/alpine."""
        alice = self.alice_caches()
        anonymous = self.headers_for("library/alpine")
        for kind, digest, error in (
            ("blobs", self.private_blob, "BLOB_UNKNOWN"),
            ("manifests", self.private_manifest, "MANIFEST_UNKNOWN"),
        ):
            with self.subTest(kind=kind):
                path = f"/v2/library/alpine/{kind}/{digest}"
                self.assert_refused(self.mirror.get(path, anonymous), 404, error)
                head = self.mirror.request("HEAD", path, anonymous)
                self.assertEqual(head.code, 404)
                self.assertEqual(head.body, b"")
                # No credentials at all: the upstream's challenge.
                self.assert_refused(self.mirror.get(path), 401, "UNAUTHORIZED")
                # alice still gets her content from the cache.
                mine = self.mirror.get(f"/v2/alice/private/{kind}/{digest}", alice)
                self.assertEqual((mine.code, mine.header("x-mirrord-cache")), (200, "HIT"))

    def test_client_of_another_private_repository_gets_nothing(self) -> None:
        """bob, accepted for bob/secret, cannot read alice's private content
        by asking for it under bob/secret or under alice/private."""
        self.alice_caches()
        bob = self.headers_for("bob/secret", BOB)
        for kind, digest, error in (
            ("blobs", self.private_blob, "BLOB_UNKNOWN"),
            ("manifests", self.private_manifest, "MANIFEST_UNKNOWN"),
        ):
            with self.subTest(kind=kind):
                own = self.mirror.get(f"/v2/bob/secret/{kind}/{digest}", bob)
                self.assert_refused(own, 404, error)
                theirs = self.mirror.get(f"/v2/alice/private/{kind}/{digest}", bob)
                self.assert_refused(theirs, 401, "UNAUTHORIZED")

    def test_same_repository_name_on_another_registry(self) -> None:
        """Being accepted for other.io's public alice/private does not open
        Docker Hub's private alice/private."""
        self.alice_caches()
        other = {**ACCEPT}
        reply = self.mirror.get("/v2/other.io/alice/private/manifests/latest", other)
        self.assertEqual(reply.code, 200, reply.body)
        path = f"/v2/other.io/alice/private/blobs/{self.private_blob}"
        self.assert_refused(self.mirror.get(path, other), 404, "BLOB_UNKNOWN")

    def test_fill_in_progress_is_not_followed_by_a_stranger(self) -> None:
        """While alice's private blob is still being fetched, a client of
        library/alpine asking for it gets 404, not the growing file."""
        alice = self.headers_for("alice/private", ALICE)
        anonymous = self.headers_for("library/alpine")
        self.hub.cdn_hold_at = 10_000
        pending = self.mirror.client.get(
            f"https://mirror.test/v2/alice/private/blobs/{self.private_blob}", headers=alice
        )
        self.mirror.settle()
        self.assertEqual(self.hub.counts["cdn GET"], 1)
        stranger = self.mirror.get(f"/v2/library/alpine/blobs/{self.private_blob}", anonymous)
        self.assert_refused(stranger, 404, "BLOB_UNKNOWN")
        self.hub.release_cdn()
        self.mirror.settle()
        response = self.successResultOf(pending)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.hub.counts["cdn GET"], 1)

    def test_verification_expires(self) -> None:
        """Once auth_ttl has passed, the upstream is asked again: a revoked
        user no longer gets cached private content."""
        alice = self.alice_caches()
        path = f"/v2/alice/private/blobs/{self.private_blob}"
        self.hub.revoked.add("alice")
        within = self.mirror.get(path, alice)
        self.assertEqual((within.code, within.header("x-mirrord-cache")), (200, "HIT"))
        self.mirror.clock.advance(301)
        self.assert_refused(self.mirror.get(path, alice), 401, "UNAUTHORIZED")
        manifest = f"/v2/alice/private/manifests/{self.private_manifest}"
        self.assert_refused(self.mirror.get(manifest, alice), 401, "UNAUTHORIZED")

    def test_stale_tag_only_for_verified_clients(self) -> None:
        """During an outage alice's private tag is served stale to alice
        only, and not once her verification has expired."""
        alice = self.alice_caches()
        anonymous = self.headers_for("library/alpine")
        self.mirror.clock.advance(61)  # past tag_ttl: the tag is asked for again
        self.hub.outage = True
        path = "/v2/alice/private/manifests/latest"
        stale = self.mirror.get(path, alice)
        self.assertEqual((stale.code, stale.header("x-mirrord-cache")), (200, "STALE"))
        self.assertNotEqual(self.mirror.get(path, anonymous).code, 200)
        self.assertNotEqual(self.mirror.get(path).code, 200)
        self.mirror.clock.advance(301)
        self.assertNotEqual(self.mirror.get(path, alice).code, 200)
        self.assertEqual(self.mirror.get(path, anonymous).code, 503)

    def test_upstream_confirmation_opens_the_same_content_elsewhere(self) -> None:
        """A client the upstream gives the digest to, under a repository
        holding it too, is served from the cache (one fetch in all)."""
        self.alice_caches()
        self.hub.users["carol"] = "pw"
        self.hub.add("carol/copy", self.mirror.private)
        self.hub.private.add("carol/copy")
        carol = self.headers_for("carol/copy", ("carol", "pw"))
        reply = self.mirror.get(f"/v2/carol/copy/blobs/{self.private_blob}", carol)
        self.assertEqual((reply.code, reply.header("x-mirrord-cache")), (200, "HIT"))
        self.assertEqual(reply.body, self.private_bytes)
        self.assertEqual(self.hub.counts["cdn GET"], 1)
