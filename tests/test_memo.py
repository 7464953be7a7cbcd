"""Manifests served from memory: the memo stays within its bounds, a hit
reads no file, what the store lets go of is not served from memory, and
private manifests held in memory still go only to clients who may read
them."""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mirrord.serve.memo import ManifestMemo
from mirrord.store.disk import Entry, Meta
from tests.support.images import OCI_MANIFEST
from tests.support.memory import MemoryMirror

ACCEPT = {"Accept": [OCI_MANIFEST]}


def entry(digest: str, size: int) -> Entry:
    return Entry(digest, size, Meta(), 0.0)


class BoundsTests(SynchronousTestCase):
    def test_bytes_bounded_least_recently_used_first(self) -> None:
        """Past its byte limit the memo drops the manifests used least recently."""
        memo = ManifestMemo(max_bytes=3000, max_item=1000)
        entries = {f"sha256:{i}": entry(f"sha256:{i}", 1000) for i in range(5)}
        for digest, e in list(entries.items())[:3]:
            memo.put(digest, e, b"x" * 1000)
        self.assertIsNotNone(memo.get("sha256:0", entries["sha256:0"]))  # 0 used last
        for digest, e in list(entries.items())[3:]:
            memo.put(digest, e, b"x" * 1000)
        self.assertEqual((memo.size, len(memo)), (3000, 3))
        held = [d for d, e in entries.items() if memo.get(d, e) is not None]
        self.assertEqual(held, ["sha256:0", "sha256:3", "sha256:4"])

    def test_large_manifest_not_held(self) -> None:
        """A manifest over the per-item limit is not kept in memory."""
        memo = ManifestMemo(max_bytes=10_000, max_item=1000)
        big = entry("sha256:big", 1001)
        memo.put("sha256:big", big, b"x" * 1001)
        self.assertIsNone(memo.get("sha256:big", big))
        self.assertEqual(memo.size, 0)

    def test_other_entry_misses(self) -> None:
        """Bytes read for an entry the store has since replaced are not served."""
        memo = ManifestMemo()
        old, new = entry("sha256:a", 3), entry("sha256:a", 3)
        memo.put("sha256:a", old, b"abc")
        self.assertIsNone(memo.get("sha256:a", new))
        self.assertEqual((memo.size, len(memo)), (0, 0))


class ServedFromMemoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.mirror = MemoryMirror(self, Path(tempfile.mkdtemp()))
        self.digest = self.mirror.alpine.manifest_digest
        self.path = f"/v2/library/alpine/manifests/{self.digest}"
        self.body = self.mirror.alpine.blob_path(self.digest).read_bytes()

    def test_hit_reads_no_file(self) -> None:
        """Once served, a manifest's next hit comes from memory: right bytes
        even with its cache file gone."""
        headers = {**ACCEPT, **self.mirror.pull_headers("library/alpine")}
        first = self.mirror.get(self.path, headers)
        self.assertEqual((first.code, first.body), (200, self.body))
        self.assertEqual(self.mirror.get(self.path, headers).header("x-mirrord-cache"), "HIT")
        self.mirror.store.data_path(self.digest).unlink()
        again = self.mirror.get(self.path, headers)
        self.assertEqual((again.code, again.header("x-mirrord-cache")), (200, "HIT"))
        self.assertEqual(again.body, self.body)

    def test_forgotten_manifest_not_served_from_memory(self) -> None:
        """A manifest the store forgot (evicted, purged) is fetched again, not
        answered from memory."""
        headers = {**ACCEPT, **self.mirror.pull_headers("library/alpine")}
        self.mirror.get(self.path, headers)
        self.mirror.get(self.path, headers)
        # As an admin's delete does: out of the index, then off the disk
        # (where another process sharing the cache would look).
        self.assertTrue(self.mirror.store.forget(self.digest))
        self.mirror.store.remove_files(self.digest)
        fetched = self.mirror.hub.counts["GET manifests"]
        again = self.mirror.get(self.path, headers)
        self.assertEqual((again.code, again.header("x-mirrord-cache")), (200, "MISS"))
        self.assertEqual(again.body, self.body)
        self.assertEqual(self.mirror.hub.counts["GET manifests"], fetched + 1)


class PrivateInMemoryTests(SynchronousTestCase):
    def test_private_manifest_in_memory_refused_to_others(self) -> None:
        """alice's private manifest, served to her twice (so held in memory),
        is refused to an anonymous client and to one with no credentials
        asking for its digest, and still served to alice."""
        mirror = MemoryMirror(self, Path(tempfile.mkdtemp()))
        digest = mirror.private.manifest_digest
        body = mirror.private.blob_path(digest).read_bytes()
        alice = {**ACCEPT, **mirror.pull_headers("alice/private", ("alice", "secret"))}
        mine = f"/v2/alice/private/manifests/{digest}"
        for _ in range(2):
            reply = mirror.get(mine, alice)
            self.assertEqual((reply.code, reply.body), (200, body))
        self.assertEqual(reply.header("x-mirrord-cache"), "HIT")
        stranger = {**ACCEPT, **mirror.pull_headers("library/alpine")}
        for path, headers, code in (
            (f"/v2/library/alpine/manifests/{digest}", stranger, 404),
            (mine, stranger, 401),
            (mine, ACCEPT, 401),
        ):
            with self.subTest(path=path, headers=headers):
                refused = mirror.get(path, headers)
                self.assertEqual(refused.code, code, refused.body)
                self.assertNotEqual(refused.body, body)
                self.assertNotEqual(refused.header("x-mirrord-cache"), "HIT")
        self.assertEqual(mirror.get(mine, alice).body, body)
