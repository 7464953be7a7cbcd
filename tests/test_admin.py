"""Inspecting and pruning the cache (``mirrord-admin``): the listing, deletes
that keep what another image shares, pins that survive eviction and
restarts, and the daemon's admin socket protocol."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mirrord import admin
from mirrord.config import CacheConfig, Config
from mirrord.daemon.admin import Admin, AdminProtocol
from mirrord.daemon.tap import open_store
from mirrord.store import inventory
from mirrord.store.disk import BlobStore, Meta, TagRecord
from mirrord.store.index import SharedIndex
from tests.support.images import OCI_CONFIG, OCI_MANIFEST

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Cache:
    """A state directory with two tags of ``library/app`` sharing a base
    layer, and ``library/other``."""

    def __init__(self, root: Path) -> None:
        self.state = root
        self.store = BlobStore(root / "cache", 1 << 30)
        self.base = self.put(os.urandom(3000), LAYER, "library/app")
        self.one = self.image("library/app", "1.0", os.urandom(1000))
        self.two = self.image("library/app", "2.0", os.urandom(2000))
        self.other = self.image("library/other", "latest", os.urandom(500))

    def put(self, data: bytes, media_type: str, repository: str) -> str:
        digest = _digest(data)
        self.store.put_bytes(digest, data, Meta(media_type, repository, True, "docker.io"))
        return digest

    def image(self, repository: str, tag: str, layer: bytes) -> dict[str, str]:
        config = json.dumps({"tag": tag}).encode()
        digests = {
            "layer": self.put(layer, LAYER, repository),
            "config": self.put(config, OCI_CONFIG, repository),
        }
        layers = [digests["layer"]] + ([self.base] if repository == "library/app" else [])
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"digest": digests["config"]},
                "layers": [{"digest": d} for d in layers],
            }
        ).encode()
        digests["manifest"] = self.put(manifest, OCI_MANIFEST, repository)
        record = TagRecord(digests["manifest"], OCI_MANIFEST, len(manifest), 100.0, True)
        self.store.tags.put("docker.io", repository, tag, record)
        return digests


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = admin.main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


class InventoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cache = Cache(Path(tempfile.mkdtemp()))
        self.store = self.cache.store

    def test_listing_shows_repositories_tags_sizes_and_blob_counts(self) -> None:
        """The listing has each repository and tag with its image's bytes and blob count."""
        repos = inventory.listing(inventory.View.of(self.store))
        by_name = {r["repository"]: r for r in repos}
        self.assertEqual(sorted(by_name), ["library/app", "library/other"])
        app = by_name["library/app"]
        self.assertEqual([t["tag"] for t in app["tags"]], ["1.0", "2.0"])
        one = app["tags"][0]
        self.assertEqual(one["blobs"], 4)  # manifest, config, own layer, base
        expected = sum(
            self.store.entries[d].size for d in [*self.cache.one.values(), self.cache.base]
        )
        self.assertEqual(one["size"], expected)
        self.assertEqual(app["blobs"], 7)  # the base counted once
        self.assertEqual(by_name["library/other"]["blobs"], 3)

    def test_delete_tag_removes_its_blobs_and_keeps_shared_ones(self) -> None:
        """Deleting app:1.0 removes its manifest, config and layer; the shared base and 2.0 stay."""
        code, out, err = run("--state-dir", str(self.cache.state), "delete", "library/app:1.0")
        self.assertEqual(code, 0, err)
        self.assertIn("removed 1 tags, 3 blobs", out)
        after = BlobStore(self.cache.state / "cache", 1 << 30)
        after.rebuild()
        for digest in self.cache.one.values():
            self.assertNotIn(digest, after.entries)
            self.assertFalse(after.data_path(digest).exists())
        for digest in [self.cache.base, *self.cache.two.values(), *self.cache.other.values()]:
            self.assertIn(digest, after.entries)
        tags = {(name, tag) for _, name, tag, _ in after.tags.all()}
        self.assertEqual(tags, {("library/app", "2.0"), ("library/other", "latest")})

    def test_cache_elsewhere_is_found_and_its_shared_index_follows_a_delete(self) -> None:
        """With ``[cache] path`` elsewhere, a stopped daemon's cache is found
        there, and a delete leaves the index other daemons count on in step."""
        state = Path(tempfile.mkdtemp())
        config = state / "mirrord.toml"
        config.write_text(
            f'state_dir = "{state}"\n[cache]\npath = "{self.cache.state / "cache"}"\n'
        )
        index = SharedIndex(self.cache.state / "cache")
        self.addCleanup(index.close)
        index.reconcile(
            [(d, e.size, 1.0, e.meta.repository) for d, e in self.store.entries.items()],
            lambda digest: True,
        )
        code, out, err = run("--config", str(config), "delete", "library/app:1.0")
        self.assertEqual(code, 0, err)
        self.assertIn("removed 1 tags, 3 blobs", out)
        self.assertEqual(index.digests(), set(self.store.entries) - set(self.cache.one.values()))

    def test_delete_repository_removes_everything_it_alone_holds(self) -> None:
        """Deleting library/app removes both tags and every blob of the repository."""
        code, _, err = run("--state-dir", str(self.cache.state), "delete", "library/app")
        self.assertEqual(code, 0, err)
        after = BlobStore(self.cache.state / "cache", 1 << 30)
        after.rebuild()
        self.assertEqual(set(after.entries), set(self.cache.other.values()))
        self.assertFalse((self.cache.state / "cache/tags/docker.io/library/app").exists())

    def test_dry_run_removes_nothing(self) -> None:
        """--dry-run lists what would go and leaves the files in place."""
        code, out, _ = run("--state-dir", str(self.cache.state), "delete", "-n", "library/other")
        self.assertEqual(code, 0)
        self.assertIn("would remove 1 tags, 3 blobs", out)
        for digest in self.cache.other.values():
            self.assertTrue(self.store.data_path(digest).exists())

    def test_blob_being_read_is_kept(self) -> None:
        """A delete leaves a blob a client is reading in the index and on disk."""
        layer = self.cache.other["layer"]
        self.store.entries[layer].readers = 1
        plan = inventory.plan_delete(
            inventory.View.of(self.store), inventory.Target.parse("library/other")
        )
        tag_files, removed, busy = inventory.apply_index(self.store, plan)
        inventory.remove_files(self.store, tag_files, removed)
        self.assertEqual(busy, [layer])
        self.assertIn(layer, self.store.entries)
        self.assertTrue(self.store.data_path(layer).exists())
        self.assertFalse(self.store.data_path(self.cache.other["manifest"]).exists())

    def test_list_and_show_print_for_people(self) -> None:
        """`list` prints repositories and tags; `show` prints the image's manifest and layers."""
        code, out, _ = run("--state-dir", str(self.cache.state), "list")
        self.assertEqual(code, 0)
        self.assertIn("docker.io/library/app", out)
        self.assertIn(":2.0", out)
        code, out, _ = run("--state-dir", str(self.cache.state), "show", "library/app:2.0")
        self.assertEqual(code, 0)
        manifests, blobs = out.split("blobs:\n")
        self.assertIn(self.cache.two["manifest"], manifests)
        self.assertIn(self.cache.base, blobs)
        self.assertIn(self.cache.two["layer"], blobs)
        code, _, err = run("--state-dir", str(self.cache.state), "show", "library/none:1")
        self.assertEqual((code, err), (1, "mirrord-admin: library/none:1 is not cached\n"))

    def test_pin_keeps_an_image_through_eviction_after_a_restart(self) -> None:
        """A tag pinned with `mirrord-admin pin` stays when the restarted daemon evicts."""
        code, _, err = run("--state-dir", str(self.cache.state), "pin", "library/app:1.*")
        self.assertEqual(code, 0, err)
        config = Config(
            state_dir=str(self.cache.state), cache=CacheConfig(max_size=8000, low_watermark=0.1)
        )
        store = open_store(config, Clock())
        assert store is not None
        store.put_bytes(*self._blob(os.urandom(3000)))
        store.evict()
        kept = set(store.entries)
        self.assertTrue({self.cache.base, *self.cache.one.values()} <= kept, kept)
        self.assertFalse(set(self.cache.two.values()) & kept)
        code, out, _ = run("--state-dir", str(self.cache.state), "pins")
        self.assertIn("admin pins: library/app:1.*", out)

    def test_no_write_while_a_daemon_holds_the_state_directory(self) -> None:
        """With a live daemon's lock beside a socket that does not answer, a delete is refused;
        reads still work, and a lock left by a dead process does not block."""
        lock = self.cache.state / "admin.sock.lock"
        os.symlink(str(os.getpid()), lock)
        code, _, err = run("--state-dir", str(self.cache.state), "delete", "library/other")
        self.assertEqual(code, 1)
        self.assertIn("its socket does not answer: not writing", err)
        self.assertTrue(self.store.data_path(self.cache.other["layer"]).exists())
        self.assertEqual(run("--state-dir", str(self.cache.state), "list")[0], 0)
        lock.unlink()
        os.symlink("999999999", lock)
        self.assertEqual(run("--state-dir", str(self.cache.state), "delete", "library/other")[0], 0)

    def _blob(self, data: bytes) -> tuple[str, bytes, Meta]:
        return _digest(data), data, Meta(LAYER, "library/new", True, "docker.io")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class ProgressTests(SynchronousTestCase):
    def test_progress_is_one_updating_line_on_a_terminal_and_plain_lines_otherwise(self) -> None:
        """On a terminal progress rewrites one line and ends it; in a log, no escapes."""
        tty = Terminal()
        progress = admin.Progress(tty, "removing blobs")
        for done in range(1, 4):
            progress(done, 3)
        progress.close()
        self.assertTrue(tty.getvalue().startswith("\rremoving blobs: 1/3\x1b[K"))
        self.assertTrue(tty.getvalue().endswith("\rremoving blobs: 3/3\x1b[K\n"))
        self.assertEqual(tty.getvalue().count("\n"), 1)
        log = io.StringIO()
        progress = admin.Progress(log, "removing blobs")
        for done in range(1, 4):
            progress(done, 3)
        progress.close()
        self.assertEqual(log.getvalue(), "removing blobs: 1/3\nremoving blobs: 3/3\n")


class CheckConfigTests(SynchronousTestCase):
    def test_check_config_is_the_daemons_check(self) -> None:
        """`mirrord-admin check-config` exits 0 with the settings, or 1 with the file's error."""
        tmp = Path(tempfile.mkdtemp())
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        good = tmp / "good.toml"
        good.write_text(f'state_dir = "{tmp / "state"}"\n')
        self.assertEqual(run("check-config", "--config", str(good))[0], 0)
        self.assertIn(f"mirrord: configuration {good} is ok", stdout.getvalue())
        bad = tmp / "bad.toml"
        bad.write_text("bogus = 1\n")
        code, _, err = run("check-config", "--config", str(bad))
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith(f"mirrord: {bad}: unknown key 'bogus'"), err)


class SocketTests(SynchronousTestCase):
    """The daemon's side: one JSON request a line, on the live store."""

    def setUp(self) -> None:
        self.cache = Cache(Path(tempfile.mkdtemp()))
        self.store = self.cache.store
        self.clock = Clock()
        self.clock.callFromThread = lambda f, *a: f(*a)  # type: ignore[attr-defined]
        self.admin = Admin(self.clock, self.store, maybeDeferred, ())
        self.protocol = AdminProtocol(self.admin)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def ask(self, request: dict) -> list[dict]:
        self.transport.clear()
        self.protocol.dataReceived(json.dumps(request).encode() + b"\n")
        return [json.loads(line) for line in self.transport.value().splitlines()]

    def test_delete_through_the_socket_updates_the_live_index(self) -> None:
        """A delete on the socket answers with what went and the index no longer has it."""
        size = self.store.size
        answer = self.ask({"op": "delete", "target": "library/app:2.0"})
        self.assertEqual(answer[-1]["ok"], True)
        self.assertEqual(answer[-1]["result"]["tags"], ["docker.io/library/app:2.0"])
        self.assertEqual([m["progress"] for m in answer[:-1]][-1], [3, 3])
        for digest in self.cache.two.values():
            self.assertNotIn(digest, self.store.entries)
        self.assertIn(self.cache.base, self.store.entries)
        removed = answer[-1]["result"]["bytes"]
        self.assertEqual(self.store.size, size - removed)
        listed = self.ask({"op": "list"})[-1]["result"]
        self.assertEqual([t["tag"] for t in listed[0]["tags"]], ["1.0"])

    def test_manifest_arriving_while_a_delete_is_planned_keeps_its_layers(self) -> None:
        """A manifest cached while the delete was planned (off the reactor) keeps what it
        references: the plan is made again."""
        layer = self.cache.other["layer"]
        late = json.dumps({"schemaVersion": 2, "layers": [{"digest": layer}]}).encode()

        def run(f, *args):  # a pull publishes a manifest while the worker plans
            result = maybeDeferred(f, *args)
            if f is inventory.plan_delete and _digest(late) not in self.store.entries:
                self.cache.put(late, OCI_MANIFEST, "library/copy")
            return result

        self.admin.run = run
        answer = self.ask({"op": "delete", "target": "library/other"})[-1]
        self.assertTrue(answer["ok"], answer)
        self.assertNotIn(layer, answer["result"]["blobs"])
        self.assertTrue(self.store.data_path(layer).exists())
        self.assertNotIn(self.cache.other["manifest"], self.store.entries)

    def test_pin_through_the_socket_applies_at_once(self) -> None:
        """A pin on the socket protects the image from the next eviction and is saved."""
        self.assertEqual(self.ask({"op": "pin", "pattern": "library/other"})[-1]["ok"], True)
        self.assertTrue(self.store.is_pinned(self.store.entries[self.cache.other["layer"]]))
        self.assertEqual(inventory.read_pins(self.store.root), ("library/other",))

    def test_bad_requests_get_an_error_line(self) -> None:
        """Garbage, unknown operations and unknown images are answered, not crashed on."""
        self.transport.clear()
        self.protocol.dataReceived(b"{nope\n")
        self.assertFalse(json.loads(self.transport.value())["ok"])
        self.assertFalse(self.ask({"op": "explode"})[-1]["ok"])
        answer = self.ask({"op": "delete", "target": "library/none"})[-1]
        self.assertEqual(answer, {"ok": False, "error": "library/none is not cached"})

    def test_idle_connection_is_closed(self) -> None:
        """A client that says nothing is disconnected after the idle timeout."""
        self.clock.advance(61)
        self.assertTrue(self.transport.disconnecting or self.transport.disconnected)
