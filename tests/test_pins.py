"""Pinned tags against eviction, from the tags' index in memory: the tag
files and pinned manifests are read once, not on every publication, and
the pins follow tags that move and manifests that arrive late."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mirrord.store.disk import BlobStore, Meta, TagRecord
from tests.support.images import OCI_INDEX, OCI_MANIFEST


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _manifest(*layers: bytes) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "layers": [{"digest": _digest(layer)} for layer in layers],
        }
    ).encode()


class PinTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp())
        self.now = [1000.0]
        # Pinned content (about 1300 bytes) keeps the store above its high
        # watermark: every publication runs an eviction pass.
        self.store = self.new_store()
        self.reads: list[Path] = []
        real_read_bytes, real_read_text = Path.read_bytes, Path.read_text

        def read_bytes(path: Path) -> bytes:
            self.reads.append(path)
            return real_read_bytes(path)

        def read_text(path: Path, *args: object, **kwargs: object) -> str:
            self.reads.append(path)
            return real_read_text(path, *args, **kwargs)  # type: ignore[arg-type]

        self.patch(Path, "read_bytes", read_bytes)
        self.patch(Path, "read_text", read_text)

    def new_store(self) -> BlobStore:
        return BlobStore(self.root, 1500, 0.8, 0.5, ("library/app:1.*",), now=lambda: self.now[0])

    def put(self, data: bytes, media_type: str = "application/octet-stream") -> str:
        self.now[0] += 1
        digest = _digest(data)
        self.store.put_bytes(digest, data, Meta(media_type, "library/app"))
        return digest

    def tag(self, tag: str, manifest: bytes, media_type: str = OCI_MANIFEST) -> None:
        record = TagRecord(_digest(manifest), media_type, len(manifest), self.now[0], True)
        self.store.tags.put("docker.io", "library/app", tag, record)

    def pinned_image(self) -> tuple[bytes, bytes]:
        layer = os.urandom(1200)
        manifest = _manifest(layer)
        self.put(layer)
        self.put(manifest, OCI_MANIFEST)
        self.tag("1.2", manifest)
        return layer, manifest

    def publish_and_evict(self, count: int) -> list[str]:
        removed = []
        for _ in range(count):
            self.put(os.urandom(100))
            removed += self.store.evict()
        return removed

    def test_eviction_reads_tags_and_manifests_once_not_per_publish(self) -> None:
        """Past the watermark, 20 publications read no tag file or manifest after the first."""
        layer, _ = self.pinned_image()
        self.publish_and_evict(1)
        self.reads.clear()
        removed = self.publish_and_evict(20)
        self.assertEqual([p for p in self.reads if self.root in p.parents], [])
        self.assertEqual(len(removed), 20, "every unpinned blob is evicted")
        self.assertIsNotNone(self.store.get(_digest(layer)))

    def test_index_in_memory_outlives_tag_files_removed_behind_it(self) -> None:
        """Once loaded, the pins hold even if the tag files vanish: they are not re-read."""
        layer, _ = self.pinned_image()
        self.publish_and_evict(1)
        shutil.rmtree(self.root / "tags")
        self.publish_and_evict(5)
        self.assertIsNotNone(self.store.get(_digest(layer)))

    def test_moved_tag_moves_the_pin(self) -> None:
        """When the pinned tag moves to a new manifest, the old image becomes evictable."""
        old_layer, _ = self.pinned_image()
        self.publish_and_evict(1)
        new_layer = os.urandom(150)
        new_manifest = _manifest(new_layer)
        self.put(new_layer)
        self.put(new_manifest, OCI_MANIFEST)
        self.tag("1.2", new_manifest)
        removed = self.publish_and_evict(1)
        self.assertIn(_digest(old_layer), removed)
        self.assertIsNotNone(self.store.get(_digest(new_layer)))
        self.assertIsNotNone(self.store.get(_digest(new_manifest)))

    def test_pinned_manifest_arriving_later_pins_its_layers(self) -> None:
        """A pinned index cached before its image's manifest: that manifest's layers are pinned."""
        layer = os.urandom(1000)
        manifest = _manifest(layer)
        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [{"digest": _digest(manifest)}],
            }
        ).encode()
        self.put(index, OCI_INDEX)
        self.tag("1.2", index, OCI_INDEX)
        self.put(os.urandom(1100))  # above the watermark: the next publication evicts
        self.assertTrue(self.publish_and_evict(1))  # pins computed while the manifest is missing
        self.put(layer)
        self.put(manifest, OCI_MANIFEST)
        self.publish_and_evict(3)
        self.assertIsNotNone(self.store.get(_digest(layer)))

    def test_tags_on_disk_pin_after_a_restart(self) -> None:
        """A restarted store reads the tag files once and pins what they name."""
        layer, _ = self.pinned_image()
        self.store = self.new_store()
        self.store.rebuild()
        self.publish_and_evict(3)
        self.assertIsNotNone(self.store.get(_digest(layer)))

    def test_under_the_watermark_eviction_reads_nothing(self) -> None:
        """Below the high watermark a publication's eviction pass touches no file."""
        self.tag("1.2", b"{}")  # on disk, from before a restart
        self.store = BlobStore(self.root, 10**6, pinned=("library/app:1.*",))
        self.reads.clear()
        self.assertEqual(self.publish_and_evict(10), [])
        self.assertEqual(self.reads, [])


class TagRecordsFollowTheirManifestTests(SynchronousTestCase):
    def test_evicted_manifest_takes_its_tag_records(self) -> None:
        """Tag records go with their evicted manifest: the tags kept stay
        bounded by the cache (a record alone could never be served)."""
        root = Path(tempfile.mkdtemp())
        store = BlobStore(root, 1000, 0.9, 0.8)
        kept = b'{"keep": 1}'
        gone = b'{"gone": 2}'
        for data in (gone, kept):
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            store.put_bytes(digest, data, Meta("application/json", "library/app"))
        store.tags.put("docker.io", "library/app", "old", TagRecord(_d(gone), "x", 11, 1.0, True))
        store.tags.put("docker.io", "library/app", "new", TagRecord(_d(kept), "x", 11, 2.0, True))
        store.entries[_d(gone)].last_access = 0
        store.max_size = 15  # over the high watermark: the older manifest goes
        self.assertEqual(store.evict(), [_d(gone)])
        self.assertIsNone(store.tags.get("docker.io", "library/app", "old"))
        self.assertFalse((root / "tags" / "docker.io" / "library/app" / "old.json").exists())
        self.assertIsNotNone(store.tags.get("docker.io", "library/app", "new"))


def _d(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
