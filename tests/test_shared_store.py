"""Several processes on one cache directory, piece by piece: the fill lock
(``mirrord.store.shared``), the follower of another process's fill on a
task.Clock (``mirrord.store.follow``), the shared index
(``mirrord.store.index``), the restart scan, and two in-memory mirrors on
one cache directory (flock conflicts between two open files even in one
process, so two stores here behave as two daemons do)."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.test.requesthelper import DummyRequest

from mirrord.front.history import History
from mirrord.front.status import StatusSource, totals
from mirrord.front.texts import TEXTS
from mirrord.metrics import Metrics, _CacheGauges
from mirrord.store import shared
from mirrord.store.disk import FIGURES_EVERY, BlobStore, Meta
from mirrord.store.fill import FileStreamer
from mirrord.store.follow import RemoteFill
from mirrord.store.index import SharedIndex
from tests.support.blobs import Collector, PacedBlobs
from tests.support.memory import DEFAULT_CACHE, MIRROR, MemoryMirror


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FillLockTests(SynchronousTestCase):
    """The lock a filling process holds on its digest's temporary file."""

    def setUp(self) -> None:
        self.store = BlobStore(Path(tempfile.mkdtemp()), 1 << 30)
        self.digest = _digest(b"blob")

    def test_second_claim_follows_while_the_first_holds(self) -> None:
        """While one claim holds a digest's lock, another only gets to follow it."""
        first = self.store.claim(self.digest)
        second = self.store.claim(self.digest)
        self.addCleanup(second.release)
        self.assertEqual((first.locked, second.locked), (True, False))
        first.release()
        third = self.store.claim(self.digest)
        self.addCleanup(third.release)
        self.assertTrue(third.locked, "the lock was not free after its holder let go")

    def test_lock_of_a_killed_process_goes_with_it_and_its_bytes_are_dropped(self) -> None:
        """A process killed mid-fill frees the lock; the next claim starts
        from an empty file (the dead filler's bytes are never trusted)."""
        path = shared.fill_path(self.store.root / "tmp", self.digest)
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import fcntl, os, sys, time\n"
                f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "os.write(fd, b'half a blob')\n"
                "print('held', flush=True)\n"
                "time.sleep(60)\n",
            ],
            stdout=subprocess.PIPE,
        )
        self.addCleanup(child.wait, 10)
        self.addCleanup(lambda: child.poll() is None and child.kill())
        assert child.stdout is not None
        self.assertEqual(child.stdout.readline(), b"held\n")
        following = self.store.claim(self.digest)
        self.assertFalse(following.locked)
        self.assertFalse(self.store.probe(following).abandoned)
        following.release()
        child.kill()
        child.wait(10)
        taken = self.store.claim(self.digest)
        self.addCleanup(taken.release)
        self.assertTrue(taken.locked)
        self.assertEqual(os.fstat(taken.fd).st_size, 0)

    def test_claim_of_a_published_blob_says_so(self) -> None:
        """A digest already published by some process is not filled again."""
        self.store.put_bytes(self.digest, b"blob", Meta())
        self.assertRaises(shared.Published, self.store.claim, self.digest)

    def test_restart_scan_keeps_held_fills_and_removes_leftovers(self) -> None:
        """The restart scan removes what dead fills left, never the file of
        a fill a live process holds."""
        held = self.store.claim(self.digest)
        self.addCleanup(held.release)
        shared.describe(held, {"meta": {}, "size": 4})
        leftover = shared.fill_path(self.store.root / "tmp", _digest(b"other"))
        leftover.write_bytes(b"half")
        (self.store.root / "tmp" / "0123abcd").write_bytes(b"half")
        restarted = BlobStore(self.store.root, 1 << 30)
        self.assertEqual(restarted.rebuild(), (0, 2))
        self.assertTrue(held.path.exists())
        self.assertTrue(shared.about_path(held.path).exists())
        self.assertFalse(leftover.exists())

    def test_restart_scan_keeps_the_description_a_live_fill_is_writing(self) -> None:
        """Another process's restart scan leaves the temporary file of a live
        fill's description alone (its filler is about to rename it)."""
        held = self.store.claim(self.digest)
        self.addCleanup(held.release)
        about = shared.about_path(held.path)
        writing = shared.describing_path(about)
        writing.write_bytes(b"{}")
        restarted = BlobStore(self.store.root, 1 << 30)
        restarted.rebuild()
        self.assertTrue(writing.exists(), "a live filler's description was removed")
        held.release()
        self.assertEqual(BlobStore(self.store.root, 1 << 30).rebuild(), (0, 1))
        self.assertFalse(writing.exists())


class FollowerTests(SynchronousTestCase):
    """A ``RemoteFill`` following another process's fill on a task.Clock."""

    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp())
        self.filler = BlobStore(self.root, 1 << 30)
        self.here = BlobStore(self.root, 1 << 30)
        self.data = os.urandom(50_000)
        self.digest = _digest(self.data)
        self.clock = Clock()
        self.claim = self.filler.claim(self.digest)
        self.temp = self.filler.new_temp(len(self.data), self.claim)
        self.meta = Meta("application/x-test", "library/x")
        shared.describe(self.claim, {"meta": dataclasses.asdict(self.meta), "size": 50_000})
        following = self.here.claim(self.digest)
        self.follower = RemoteFill(
            self.here, following, self.digest, maybeDeferred, self.clock, 5.0, 60.0
        )
        self.woken = 0

    def wake(self) -> None:
        self.woken += 1

    def test_follows_the_growing_file_then_the_publication(self) -> None:
        """The follower reports the bytes in the file as they grow, and the
        blob verified (its entry indexed here) once the filler published it."""
        ready = self.follower.start()
        self.assertIs(self.successResultOf(ready), self.follower)
        self.assertEqual(self.follower.meta, self.meta)
        self.assertEqual(self.follower.expected_size, 50_000)
        self.temp.write(self.data[:20_000])
        self.follower.wait(self.wake)
        self.clock.advance(0.05)
        self.assertEqual((self.follower.written, self.follower.verified), (20_000, False))
        self.assertEqual(self.woken, 1)
        self.temp.write(self.data[20_000:])
        self.filler.commit(self.temp, self.digest, json.dumps(self.meta.__dict__).encode(), 1.0)
        self.temp.discard()
        self.clock.advance(0.05)
        self.assertTrue(self.follower.verified)
        self.assertEqual(self.follower.written, 50_000)
        entry = self.successResultOf(self.follower.done)
        self.assertEqual((entry.size, entry.meta), (50_000, self.meta))
        self.assertIs(self.here.get(self.digest), entry)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_fill_ended_without_a_blob_ends_the_follow(self) -> None:
        """A filler that lets go without publishing (failed, or died) ends
        the follow with an error, never with a verified blob."""
        self.follower.start()
        self.temp.write(self.data[:20_000])
        self.clock.advance(0.05)
        self.temp.discard()  # a mismatch: unlinked, then the lock goes
        self.clock.advance(0.05)
        self.assertFalse(self.follower.verified)
        self.assertIn("stopped without a verified blob", self.follower.error or "")
        self.assertTrue(self.follower.done.called, "the in-flight table would keep it")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_fill_without_progress_ends_the_follow_in_bounded_time(self) -> None:
        """A live filler whose file stops growing ends the follow after ``idle``."""
        self.follower.start()
        self.temp.write(self.data[:10])
        self.clock.advance(0.05)
        self.clock.pump([0.05] * 99)
        self.assertIsNone(self.follower.error)
        self.clock.pump([0.05] * 10)
        self.assertIn("no progress", self.follower.error or "")
        self.assertTrue(self.follower.done.called, "the in-flight table would keep it")
        self.temp.discard()


class SharedIndexTests(SynchronousTestCase):
    """The index every process's eviction works from."""

    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp())
        self.one = SharedIndex(self.root)
        self.two = SharedIndex(self.root)
        self.addCleanup(self.one.close)
        self.addCleanup(self.two.close)
        self.removed: list[str] = []

    def evict(self, index: SharedIndex, keep=lambda digest, repository: False):
        return index.evict(1000, 0.9, 0.6, keep, self.removed.append)

    def test_restart_looks_at_the_files_without_locking_the_index(self) -> None:
        """A restarting process's look at every blob's file does not hold
        the index: another process records its blob meanwhile."""
        for n in range(3):
            self.one.put(f"sha256:{n}", 10, 1.0, "")
        self.two._db.execute("PRAGMA busy_timeout = 10")
        recorded: list[str] = []

        def exists(digest: str) -> bool:
            recorded.append(digest)
            if digest == "sha256:0":
                return False
            self.two.put(f"{digest}-other", 1, 1.0, "")  # another process's publication
            return True

        self.one.reconcile([], exists)
        self.assertEqual(len(recorded), 4)  # three looks, then the missing one again
        self.assertNotIn("sha256:0", self.one.digests())

    def test_total_counts_every_process_and_eviction_is_lru_across_them(self) -> None:
        """Blobs published by two processes count together against the
        limit, and the least recently used (by anyone's hits) go first."""
        self.one.put("a", 300, 1.0, "x")
        self.two.put("b", 300, 2.0, "x")
        self.one.put("c", 300, 3.0, "x")
        self.assertEqual(self.two.total(), 900)
        self.assertEqual(self.evict(self.two), ([], 900))
        self.two.touch({"a": 4.0})  # a hit in the other process
        self.one.put("d", 300, 5.0, "x")
        removed, total = self.evict(self.one)
        self.assertEqual((removed, total), (["b", "c"], 600))
        self.assertEqual(self.removed, ["b", "c"])
        self.assertEqual(self.two.digests(), {"a", "d"})

    def test_eviction_keeps_what_the_caller_keeps(self) -> None:
        """Pinned and busy blobs stay, even when the oldest."""
        for i, name in enumerate("abcd"):
            self.one.put(name, 300, float(i), "library/pinned" if name == "a" else "x")
        removed, _ = self.evict(self.two, lambda d, repository: repository == "library/pinned")
        self.assertEqual(removed, ["b", "c"])

    def test_restart_reconciles_with_the_disk(self) -> None:
        """A scan adds blobs found on disk and drops rows whose files are gone."""
        self.one.put("gone", 300, 1.0, "x")
        self.one.reconcile([("found", 200, 2.0, "x")], lambda digest: digest == "found")
        self.assertEqual((self.two.digests(), self.two.total()), ({"found"}, 200))

    def test_blob_found_on_disk_but_never_recorded_counts_once_found(self) -> None:
        """A blob whose publisher died between linking it and recording it
        counts against the limit once a process finds it."""
        unrecorded = BlobStore(self.root, 1 << 30)  # writes no index
        unrecorded.put_bytes(_digest(b"orphan"), b"orphan", Meta())
        finder = BlobStore(self.root, 1 << 30, share=True)
        self.assertEqual(self.one.total(), 0)
        self.assertIsNotNone(finder.find(_digest(b"orphan")))
        self.assertEqual(self.one.total(), len(b"orphan"))


class SharedFiguresTests(SynchronousTestCase):
    """The cache's size and entries every worker shows."""

    def test_every_worker_shows_the_shared_cache_figures(self) -> None:
        """/metrics and the status page of a worker count the blobs another
        worker stored (within a few seconds), not only its own."""
        root = Path(tempfile.mkdtemp())
        clock = Clock()
        clock.advance(1000)
        one, two = (
            BlobStore(root, 1 << 30, now=clock.seconds, share=True, offload=maybeDeferred)
            for _ in range(2)
        )
        one.rebuild()
        two.rebuild()
        one.put_bytes(_digest(b"blob"), b"blob", Meta())
        one.put_bytes(_digest(b"other"), b"other", Meta())
        clock.advance(FIGURES_EVERY + 1)
        two.figures()  # starts a refresh on the disk worker (synchronous here)
        metrics = Metrics()
        metrics.watch(two, ())
        gauges = {m.name: m.samples[0].value for m in _CacheGauges(metrics).collect()}
        self.assertEqual(
            (gauges["mirrord_cache_size_bytes"], gauges["mirrord_cache_entries"]), (9, 2)
        )
        page = StatusSource(
            metrics, History(lambda: totals(metrics), clock), clock, {}, two, ()
        )._cache_row(TEXTS["en"])
        self.assertIn('value="9"', page)
        self.assertIn("2 blobs", page)
        self.assertEqual(one.figures(), two.figures())

    def test_blob_published_while_the_index_is_locked_is_counted_later(self) -> None:
        """A blob linked in place while another process holds the index past
        the busy timeout is served, and counted once the index is free."""
        root = Path(tempfile.mkdtemp())
        clock = Clock()
        clock.advance(1000)
        one, two = (
            BlobStore(root, 1 << 30, now=clock.seconds, share=True, offload=maybeDeferred)
            for _ in range(2)
        )
        one.rebuild()
        two.rebuild()
        assert one.shared is not None and two.shared is not None
        one.shared._db.execute("PRAGMA busy_timeout = 10")
        two.shared._db.execute("BEGIN IMMEDIATE")  # a long reconcile, say
        one.put_bytes(_digest(b"blob"), b"blob", Meta())
        self.assertEqual(one.read(_digest(b"blob")), b"blob")
        two.shared._db.execute("ROLLBACK")
        clock.advance(FIGURES_EVERY + 1)
        one.figures()
        self.assertEqual(two.shared.figures(), (4, 1))


class SharedEvictionTests(SynchronousTestCase):
    """Eviction by one process, with what the others recorded."""

    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp())
        self.stores = [
            BlobStore(self.root, 1000, 0.9, 0.6, share=True, offload=maybeDeferred)
            for _ in range(2)
        ]

    def put(self, store: BlobStore, name: bytes, repository: str) -> str:
        data = name * (300 // len(name))
        digest = _digest(data)
        store.put_bytes(digest, data, Meta(repository=repository))
        return digest

    def test_pin_set_through_another_process_holds(self) -> None:
        """A repository an admin pinned through another process (pins.json)
        is kept by this process's eviction, whatever its age."""
        one, two = self.stores
        kept = self.put(one, b"keep", "library/keep")
        (self.root / "pins.json").write_text('["library/keep"]')  # as the other's admin wrote
        others = [self.put(two, name, "x") for name in (b"aa", b"bb", b"cc")]
        one.evict()
        self.assertTrue(one.data_path(kept).exists())
        self.assertFalse(two.data_path(others[0]).exists())
        self.assertLessEqual(sum(p.stat().st_size for p in self.root.glob("blobs/*/*/*/data")), 900)


class TwoMirrorsTests(SynchronousTestCase):
    """Two in-memory mirrors on one cache directory, as two daemons."""

    def setUp(self) -> None:
        self.data = os.urandom(300_000)
        self.digest = _digest(self.data)
        self.upstream = PacedBlobs({self.digest: self.data})
        cache = Path(tempfile.mkdtemp())
        self.mirrors = []
        for _ in range(2):
            mirror = MemoryMirror(
                self,
                Path(tempfile.mkdtemp()),
                upstreams=("http://paced.test",),
                cache=dataclasses.replace(DEFAULT_CACHE, path=str(cache)),
            )
            mirror.add_host(b"paced.test", self.upstream)
            self.mirrors.append(mirror)
        self.path = f"/v2/library/x/blobs/{self.digest}"

    def start(self, mirror: MemoryMirror) -> tuple[Collector, list]:
        reader = Collector()
        responses: list = []
        d = mirror.client.get(MIRROR + self.path)
        d.addCallback(lambda response: (responses.append(response), response.deliverBody(reader)))
        mirror.settle()
        return reader, responses

    def test_second_mirror_follows_the_first_ones_fill(self) -> None:
        """A miss in the second mirror while the first fills makes no
        upstream GET: its client gets the blob from the shared file, the
        last byte only once the first published it."""
        a, b = self.mirrors
        self.upstream.hold_at = 100_000
        first, _ = self.start(a)
        second, responses = self.start(b)
        b.clock.advance(0.05)
        b.settle()
        self.assertEqual(self.upstream.gets, 1)
        self.assertEqual(second.data, self.data[: len(second.data)])
        self.assertEqual(len(second.data), 100_000)
        self.upstream.release()
        a.settle()
        a.clock.advance(1)
        self.assertIsNone(second.reason, "the last byte went before publication")
        b.clock.advance(0.05)
        b.settle()
        for reader in (first, second):
            self.assertEqual(reader.data, self.data)
            reader.reason.trap(ResponseDone)
        self.assertEqual(responses[0].headers.getRawHeaders("x-mirrord-cache"), ["COALESCED"])
        self.assertEqual(self.upstream.gets, 1)
        again = b.get(self.path)
        self.assertEqual((again.header("x-mirrord-cache"), again.body), ("HIT", self.data))

    def test_blob_the_first_published_is_a_hit_in_the_second(self) -> None:
        """A blob one mirror cached is a hit in the other, a range of it too,
        without upstream."""
        a, b = self.mirrors
        self.assertEqual(a.get(self.path).body, self.data)
        part = b.get(self.path, headers={"Range": "bytes=10-19"})
        self.assertEqual((part.code, part.body), (206, self.data[10:20]))
        reply = b.get(self.path)
        self.assertEqual((reply.header("x-mirrord-cache"), reply.body), ("HIT", self.data))
        self.assertEqual(self.upstream.gets, 1)

    def test_failed_fill_cuts_the_followers_client_and_the_next_pull_fills(self) -> None:
        """The first mirror's fill fails its digest: the second's client is
        cut short of the end, and its next pull fetches and completes."""
        a, b = self.mirrors
        self.upstream.corrupt = True
        self.upstream.hold_at = 100_000
        self.start(a)
        second, _ = self.start(b)
        b.clock.advance(0.05)
        b.settle()
        self.upstream.release()
        a.settle()
        b.clock.advance(0.05)
        b.settle()
        self.assertIsNotNone(second.reason)
        self.assertLess(len(second.data), len(self.data))
        self.upstream.corrupt = False
        self.upstream.hold_at = None
        reply = b.get(self.path)
        self.assertEqual(reply.body, self.data)
        self.assertEqual(self.upstream.gets, 2)

    def test_filler_gone_before_its_headers_leaves_the_fill_to_the_waiting_mirror(self) -> None:
        """A process that took the lock and died before the upstream answered:
        the mirror waiting on it makes no GET meanwhile, then fills itself."""
        _, b = self.mirrors
        dead = b.store.claim(self.digest)  # as another process would hold it
        reader, _ = self.start(b)
        b.clock.pump([0.05] * 20)
        b.settle()
        self.assertEqual((self.upstream.gets, reader.data), (0, b""))
        dead.release()
        b.clock.advance(0.05)
        b.settle()
        self.assertEqual(reader.data, self.data)
        reader.reason.trap(ResponseDone)
        self.assertEqual(self.upstream.gets, 1)


class _Client(DummyRequest):
    """A request that records what a client would receive: the body written
    and whether it was finished (a complete 200) or cut."""

    channel = None

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


class FollowedFileReplacedTests(SynchronousTestCase):
    """A follower's client is never sent a whole blob that is not the
    digest's bytes, whatever happened to the file it was following."""

    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp())
        self.filler = BlobStore(self.root, 1 << 30)
        self.here = BlobStore(self.root, 1 << 30)
        self.data = os.urandom(50_000)
        self.digest = _digest(self.data)
        self.meta = Meta("application/x-test", "library/x")
        self.about = {"meta": dataclasses.asdict(self.meta), "size": len(self.data)}
        self.clock = Clock()

    def follow(self) -> tuple[RemoteFill, _Client]:
        """Follow the digest's fill and stream it to a client."""
        following = self.here.claim(self.digest)
        self.assertFalse(following.locked)
        follower = RemoteFill(
            self.here, following, self.digest, maybeDeferred, self.clock, 5.0, 60.0
        )
        self.successResultOf(follower.start())
        request = _Client([b""])
        streamer = FileStreamer(
            request,
            follower.source,
            0,
            len(self.data),
            follower,
            self.clock,
            300.0,
            lambda: None,
        )
        self.outcome: list[object] = []
        streamer.start().addBoth(self.outcome.append)
        self.clock.advance(0.05)
        return follower, request

    def publish_right_blob(self) -> None:
        """Another process claims the digest, fills it right and publishes it."""
        claim = self.filler.claim(self.digest)
        self.assertTrue(claim.locked)
        temp = self.filler.new_temp(len(self.data), claim)
        shared.describe(claim, self.about)
        temp.write(self.data)
        self.filler.commit(temp, self.digest, json.dumps(self.about["meta"]).encode(), 1.0)
        temp.discard()

    def assert_cut(self, follower: RemoteFill, request: _Client) -> None:
        body = b"".join(request.written)
        self.assertFalse(
            request.finished and body != self.data, "a complete body that is not the blob"
        )
        self.assertEqual(request.finished, 0)
        self.assertFalse(follower.verified)
        self.assertIsNotNone(follower.error)

    def test_takeover_of_a_killed_fill_cuts_the_follower(self) -> None:
        """A filler killed mid-fill, then a new filler publishing the blob:
        the follower's client, sent the dead filler's bytes, is cut."""
        path = shared.fill_path(self.root / "tmp", self.digest)
        dead = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(dead, fcntl.LOCK_EX)
        shared.describe(shared.Claim(path, dead, True), self.about)
        os.write(dead, b"X" * 20_000)
        follower, request = self.follow()
        self.assertEqual(b"".join(request.written), b"X" * 20_000)
        os.close(dead)  # killed: its lock goes
        self.publish_right_blob()
        self.clock.advance(0.05)
        self.assert_cut(follower, request)

    def test_mismatch_then_another_publication_cuts_the_follower(self) -> None:
        """A fill whose body did not match its digest, then another process
        publishing the right blob before the next look: the follower's
        client, sent the rejected bytes, is cut."""
        claim = self.filler.claim(self.digest)
        temp = self.filler.new_temp(len(self.data), claim)
        shared.describe(claim, self.about)
        temp.write(b"Y" * 50_000)
        follower, request = self.follow()
        self.assertEqual(b"".join(request.written), b"Y" * 49_999)
        temp.discard()  # the digest did not match
        self.publish_right_blob()
        self.clock.advance(0.05)
        self.assert_cut(follower, request)

    def test_following_to_the_publication_sends_the_blob(self) -> None:
        """The follower of a fill that publishes sends the whole blob."""
        claim = self.filler.claim(self.digest)
        temp = self.filler.new_temp(len(self.data), claim)
        shared.describe(claim, self.about)
        temp.write(self.data[:20_000])
        follower, request = self.follow()
        temp.write(self.data[20_000:])
        self.filler.commit(temp, self.digest, json.dumps(self.about["meta"]).encode(), 1.0)
        temp.discard()
        self.clock.advance(0.05)
        self.assertTrue(follower.verified)
        self.assertEqual((b"".join(request.written), request.finished), (self.data, 1))
