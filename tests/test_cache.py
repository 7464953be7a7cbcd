"""The pull-through cache in memory: one fill per blob, followers, corrupt
upstreams, restarts, stale tags, revalidation, eviction, privacy, metrics."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone

from mirrord.config import CacheConfig, parse_size
from mirrord.front.chart import human_bytes
from mirrord.store.disk import BlobStore, Meta, TagRecord, TagStore
from mirrord.store.worker import InlineHasher
from tests.support.blobs import Collector, PacedBlobs
from tests.support.images import OCI_MANIFEST
from tests.support.memory import MemoryMirror
from tests.support.page import parse

ACCEPT = {"Accept": [OCI_MANIFEST]}


class LateHasher(InlineHasher):
    """Hashes at once but answers only when the test says: the digest
    arriving after the body has, as from the daemon's hash worker."""

    def __init__(self, algorithm: str) -> None:
        super().__init__(algorithm)
        self.answers: list[Deferred[str]] = []
        LateHasher.made.append(self)

    made: list[LateHasher] = []

    def hexdigest(self) -> Deferred[str]:
        answer: Deferred[str] = Deferred()
        self.answers.append(answer)
        return answer

    def answer(self) -> None:
        for answer in self.answers:
            answer.callback(self._hash.hexdigest())


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class BlobFillTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp())
        self.data = os.urandom(600_000)
        self.digest = _digest(self.data)
        self.mirror = MemoryMirror(self, self.tmp, upstreams=("http://paced.test",))
        self.upstream = PacedBlobs({self.digest: self.data})
        self.mirror.add_host(b"paced.test", self.upstream)
        self.path = f"/v2/library/x/blobs/{self.digest}"

    def published(self) -> None:
        """Let verified fills publish."""
        self.mirror.settle()
        self.mirror.clock.advance(1)
        self.mirror.settle()

    def start(self, hang_up: bool = False) -> tuple[object, Collector]:
        d = self.mirror.client.get("https://mirror.test" + self.path)
        collector = Collector(hang_up)
        d.addCallback(lambda response: (response.deliverBody(collector), response)[1])
        return d, collector

    def test_concurrent_clients_make_one_upstream_fetch(self) -> None:
        """16 concurrent clients of one uncached blob: one upstream GET, all get the bytes."""
        self.upstream.hold_at = 50_000  # keep the fill running while they arrive
        clients = [self.start() for _ in range(16)]
        self.mirror.settle()
        self.upstream.release()
        self.mirror.settle()
        self.assertEqual(self.upstream.gets, 1)
        statuses = []
        for d, collector in clients:
            response = self.successResultOf(d)
            statuses.append(response.headers.getRawHeaders(b"x-mirrord-cache")[0])
            self.assertEqual(collector.data, self.data)
        self.assertEqual(statuses.count(b"MISS"), 1)
        self.assertEqual(statuses.count(b"COALESCED"), 15)
        self.assertEqual(
            self.mirror.metrics.value("mirrord_cache_results_total", result="COALESCED"), 15
        )

    def test_late_client_gets_whole_blob(self) -> None:
        """A client arriving mid-fill gets the bytes already on disk, then the rest."""
        self.upstream.hold_at = 200_000
        _, first_body = self.start()
        self.mirror.settle()
        self.assertEqual(len(first_body.data), 200_000)
        _, late_body = self.start()
        self.mirror.settle()
        self.assertEqual(len(late_body.data), 200_000, "the late client was not served from disk")
        self.upstream.release()
        self.mirror.settle()
        self.assertEqual(first_body.data, self.data)
        self.assertEqual(late_body.data, self.data)
        self.assertEqual(self.upstream.gets, 1)

    def test_first_client_leaving_does_not_hurt_others(self) -> None:
        """The client that started the fill hangs up; the others and the cache still get it all."""
        self.upstream.hold_at = 100_000
        _, quitter = self.start(hang_up=True)
        self.mirror.settle()
        _, stayer = self.start()
        self.mirror.settle()
        self.assertIsNotNone(quitter.reason)
        self.upstream.release()
        self.mirror.settle()
        self.assertEqual(stayer.data, self.data)
        self.published()
        reply = self.mirror.get(self.path)
        self.assertEqual(reply.header("x-mirrord-cache"), "HIT")
        self.assertEqual(self.upstream.gets, 1)

    def test_fill_completes_when_every_reader_leaves(self) -> None:
        """With nobody reading, the fill still completes so the retry is a hit."""
        self.upstream.hold_at = 100_000
        self.start(hang_up=True)
        self.mirror.settle()
        self.upstream.release()
        self.published()
        reply = self.mirror.get(self.path)
        self.assertEqual((reply.code, reply.header("x-mirrord-cache")), (200, "HIT"))
        self.assertEqual(reply.body, self.data)

    def test_corrupt_upstream_is_never_cached_or_served_whole(self) -> None:
        """Wrong bytes abort the client before its last byte, are not cached, and are refetched."""
        self.upstream.corrupt = True
        self.upstream.hold_at = 100_000
        _, body = self.start()
        self.mirror.settle()
        self.assertEqual(len(body.data), 100_000)
        self.upstream.release()
        self.mirror.settle()
        self.assertLess(len(body.data), len(self.data))
        self.assertIsNotNone(body.reason)
        self.assertIsNone(self.mirror.store.get(self.digest))
        self.assertEqual(self.mirror.metrics.value("mirrord_digest_mismatches_total"), 1)
        self.upstream.corrupt, self.upstream.hold_at = False, None
        reply = self.mirror.get(self.path)
        self.assertEqual(reply.body, self.data)
        self.assertEqual(self.upstream.gets, 2)

    def test_hit_serves_ranges_and_head(self) -> None:
        """A cached blob answers HEAD, a Range with 206, and an unsatisfiable Range with 416."""
        self.mirror.get(self.path)
        head = self.mirror.request("HEAD", self.path)
        self.assertEqual(head.code, 200)
        self.assertEqual(head.header("content-length"), str(len(self.data)))
        self.assertEqual(head.header("docker-content-digest"), self.digest)
        part = self.mirror.get(self.path, {"Range": "bytes=100-199"})
        self.assertEqual(part.code, 206)
        self.assertEqual(part.body, self.data[100:200])
        self.assertEqual(part.header("content-range"), f"bytes 100-199/{len(self.data)}")
        tail = self.mirror.get(self.path, {"Range": "bytes=-10"})
        self.assertEqual(tail.body, self.data[-10:])
        beyond = self.mirror.get(self.path, {"Range": f"bytes={len(self.data)}-"})
        self.assertEqual(beyond.code, 416)
        self.assertEqual(self.upstream.gets, 1)

    def test_restart_removes_temporaries_and_keeps_hits(self) -> None:
        """After a restart, interrupted fills are gone and cached blobs are still hits."""
        self.mirror.get(self.path)
        self.published()
        (self.tmp / "cache" / "tmp" / "interrupted").write_bytes(b"half a blob")
        store = BlobStore(self.tmp / "cache", parse_size("1GiB"))
        entries, removed = store.rebuild()
        self.assertEqual((entries, removed), (1, 1))
        self.assertFalse((self.tmp / "cache" / "tmp" / "interrupted").exists())
        restarted = MemoryMirror(self, self.tmp, upstreams=("http://paced.test",))
        restarted.add_host(b"paced.test", self.upstream)
        restarted.store.rebuild()
        reply = restarted.get(self.path)
        self.assertEqual((reply.header("x-mirrord-cache"), reply.body), ("HIT", self.data))
        self.assertEqual(self.upstream.gets, 1)


class LateHashTests(SynchronousTestCase):
    """Verification waits for the hash worker's answer, not for the body's end."""

    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp())
        self.data = os.urandom(300_000)
        self.digest = _digest(self.data)
        LateHasher.made = []
        self.mirror = MemoryMirror(
            self, self.tmp, upstreams=("http://paced.test",), hashers=LateHasher
        )
        self.upstream = PacedBlobs({self.digest: self.data})
        self.mirror.add_host(b"paced.test", self.upstream)
        self.path = f"/v2/library/x/blobs/{self.digest}"

    def start(self) -> Collector:
        d = self.mirror.client.get("https://mirror.test" + self.path)
        collector = Collector()
        d.addCallback(lambda response: response.deliverBody(collector))
        self.mirror.settle()
        return collector

    def test_last_byte_waits_for_the_hash(self) -> None:
        """With the whole body sent, no client gets the last byte until the hash answers."""
        first = self.start()
        [hasher] = [h for h in LateHasher.made if h.answers]  # the fill's (others ran disk jobs)
        # The upstream body has ended: the fill has asked for its digest.
        self.assertEqual(len(hasher.answers), 1, "the upstream body has not ended")
        self.assertEqual(self.upstream.gets, 1)
        follower = self.start()  # arrives with the whole body on disk
        self.assertEqual(self.upstream.gets, 1)
        for body in (first, follower):
            self.assertEqual(body.data, self.data[:-1], "sent whole before verification")
            self.assertIsNone(body.reason, "finished before verification")
        hasher.answer()
        self.mirror.settle()
        for body in (first, follower):
            self.assertEqual(body.data, self.data)
            self.assertIsNotNone(body.reason)
            body.reason.trap(ResponseDone)
        self.mirror.clock.advance(1)  # publication
        reply = self.mirror.get(self.path)
        self.assertEqual((reply.header("x-mirrord-cache"), reply.body), ("HIT", self.data))

    def test_mismatch_found_late_aborts_the_reader(self) -> None:
        """A mismatch found after the whole body arrived aborts the reader short of the end."""
        self.upstream.corrupt = True
        body = self.start()
        self.assertIsNone(body.reason)
        [hasher] = [h for h in LateHasher.made if h.answers]
        hasher.answer()
        self.mirror.settle()
        self.assertIsNotNone(body.reason)
        self.assertLess(len(body.data), len(self.data))
        self.assertIsNone(self.mirror.store.get(self.digest))
        self.assertEqual(self.mirror.metrics.value("mirrord_digest_mismatches_total"), 1)


class EvictionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.now = [1000.0]
        self.store = BlobStore(
            Path(tempfile.mkdtemp()), 1000, 0.9, 0.5, ("pinned/*",), now=lambda: self.now[0]
        )

    def put(self, size: int, repository: str = "r") -> str:
        data = os.urandom(size)
        digest = _digest(data)
        self.store.put_bytes(digest, data, Meta(repository=repository))
        self.now[0] += 1
        return digest

    def at(self, when: float, size: int, repository: str = "r") -> str:
        """A blob stored (last used) at time ``when``."""
        self.now[0] = when
        return self.put(size, repository)

    def assertOnDisk(self, expected: set[str]) -> None:
        """The index, the size and the files on disk all hold exactly ``expected``."""
        self.assertEqual(set(self.store.entries), expected)
        on_disk = {
            f"sha256:{data.parent.name}" for data in self.store.root.glob("blobs/*/*/*/data")
        }
        self.assertEqual(on_disk, expected)
        self.assertEqual(self.store.size, sum(self.store.entries[d].size for d in expected))

    def test_lru_eviction_under_the_limit(self) -> None:
        """Past the high watermark the least recently used go, only until the low one is reached."""
        old = self.at(1000, 100)
        middle = self.at(1001, 300)
        twins = {self.at(1002, 200), self.at(1002, 200)}  # the same age
        self.assertEqual(self.store.evict(), [], "evicted under the high watermark")
        self.now[0] = 1003
        self.store.get(old)  # used again: now the most recent
        newest = self.at(1003, 200)
        self.assertEqual(self.store.size, 1000)
        removed = self.store.evict()
        # 1000 - 300 - 200 reaches the low watermark (500) exactly: one twin
        # goes, the other, just as old, unread and unpinned, must stay.
        self.assertEqual(len(removed), 2, removed)
        self.assertEqual(removed[0], middle)
        self.assertIn(removed[1], twins)
        [survivor] = twins - {removed[1]}
        self.assertOnDisk({old, newest, survivor})
        self.assertEqual(self.store.size, 500)
        self.assertEqual(self.store.evict(), [])

    def test_blob_being_read_and_pinned_blobs_stay(self) -> None:
        """A blob being read and a pinned one stay; an unread unpinned one of the same age goes."""
        reading = self.at(1000, 400)
        pinned = self.at(1000, 400, "pinned/app")
        loose = self.at(1000, 200)
        later = self.at(1001, 100)
        self.store.entries[reading].readers = 1
        self.assertEqual(self.store.size, 1100)
        # The low watermark (500) cannot be reached: everything evictable goes.
        self.assertEqual(self.store.evict(), [loose, later])
        self.assertOnDisk({reading, pinned})

    def test_sizes(self) -> None:
        self.assertEqual(parse_size("50GiB"), 50 << 30)
        self.assertEqual(parse_size("2MB"), 2_000_000)
        self.assertRaises(ValueError, parse_size, "lots")


class ManifestCacheTests(SynchronousTestCase):
    """Manifests against the fake Hub (tokens, rate limits) with a fallback."""

    def setUp(self) -> None:
        self.mirror = MemoryMirror(
            self,
            Path(tempfile.mkdtemp()),
            cache=CacheConfig(stale_max_age=3600, tag_ttl=0),
        )
        self.hub = self.mirror.hub
        self.path = "/v2/library/alpine/manifests/latest"

    def pull(self, name: str = "library/alpine", auth=None, path: str | None = None):
        headers = {**ACCEPT, **self.mirror.pull_headers(name, auth=auth)}
        return self.mirror.get(path or self.path, headers), headers

    def test_revalidation_by_head_saves_gets(self) -> None:
        """The second pull of a tag costs a HEAD, not a GET, and is a hit."""
        first, _ = self.pull()
        self.assertEqual(first.header("x-mirrord-cache"), "MISS")
        heads = self.hub.counts["HEAD manifests"]
        second, _ = self.pull()
        self.assertEqual(second.header("x-mirrord-cache"), "HIT")
        self.assertEqual(second.body, first.body)
        self.assertEqual(self.hub.counts["GET manifests"], 1)
        self.assertEqual(self.hub.counts["HEAD manifests"], heads + 1)

    def test_head_on_cached_manifest(self) -> None:
        """HEAD on a cached manifest by digest gives its true length, type and digest."""
        first, headers = self.pull()
        digest = first.header("docker-content-digest")
        head = self.mirror.request("HEAD", f"/v2/library/alpine/manifests/{digest}", headers)
        self.assertEqual(head.header("x-mirrord-cache"), "HIT")
        self.assertEqual(head.header("content-length"), str(len(first.body)))
        self.assertEqual(head.header("content-type"), OCI_MANIFEST)
        self.assertEqual(head.header("docker-content-digest"), digest)

    def test_stale_during_rate_limit_and_outage(self) -> None:
        """When the chain answers 429 or 503 the cached tag is served, marked STALE."""
        first, headers = self.pull()
        self.hub.ratelimit = True
        self.hub.outage = True
        stale = self.mirror.get(self.path, headers)
        self.assertEqual((stale.code, stale.header("x-mirrord-cache")), (200, "STALE"))
        self.assertEqual(stale.body, first.body)
        # /v2/ answers as it does when the upstream is up.
        self.assertEqual(self.mirror.get("/v2/").code, 401)
        self.assertEqual(self.mirror.get("/v2/", headers).code, 200)

    def test_stale_has_an_age_limit(self) -> None:
        _, headers = self.pull()
        self.hub.outage = True
        self.mirror.clock.advance(3601)
        self.assertEqual(self.mirror.get(self.path, headers).code, 503)

    def test_private_content_needs_accepted_credentials(self) -> None:
        """An anonymous client gets 401 for a cached private manifest and blob; alice gets hits."""
        path = "/v2/alice/private/manifests/latest"
        first, alice = self.pull("alice/private", auth=("alice", "secret"), path=path)
        self.assertEqual(first.code, 200)
        blob = next(
            d for d in self.mirror.private.blobs if d != self.mirror.private.manifest_digest
        )
        blob_path = f"/v2/alice/private/blobs/{blob}"
        self.assertEqual(self.mirror.get(blob_path, alice).code, 200)
        self.mirror.clock.advance(1)  # the fill publishes
        digest_path = f"/v2/alice/private/manifests/{first.header('docker-content-digest')}"
        anonymous = {**ACCEPT, **self.mirror.pull_headers("alice/private")}
        for p in (path, digest_path, blob_path):
            with self.subTest(path=p):
                self.assertEqual(self.mirror.get(p, anonymous).code, 401)
                self.assertEqual(self.mirror.get(p).code, 401)
        self.assertEqual(self.mirror.get(digest_path, alice).header("x-mirrord-cache"), "HIT")
        self.assertEqual(self.mirror.get(blob_path, alice).header("x-mirrord-cache"), "HIT")

    def test_public_content_served_without_credentials(self) -> None:
        """A public repository's cached blob is a hit even for a client with no token."""
        self.pull()
        blob = next(d for d in self.mirror.alpine.blobs if d != self.mirror.alpine.manifest_digest)
        path = f"/v2/library/alpine/blobs/{blob}"
        _, headers = self.pull()
        self.assertEqual(self.mirror.get(path, headers).header("x-mirrord-cache"), "MISS")
        self.mirror.clock.advance(1)  # the fill publishes
        self.hub.outage = True
        # The whole token flow works with every upstream down: the mirror
        # answers /v2/ and signs the token itself.
        reply = self.mirror.get(path, self.mirror.pull_headers("library/alpine"))
        self.assertEqual((reply.code, reply.header("x-mirrord-cache")), (200, "HIT"))
        self.assertEqual(self.mirror.get(path).code, 401)

    def test_metrics(self) -> None:
        """/metrics exports hits, misses, the bytes served from upstream and from
        the cache, each upstream's 429s and Hub's remaining quota."""
        headers = {**ACCEPT, **self.mirror.pull_headers("library/alpine")}
        # The token flow's bodies came from upstream too: count from here.
        before = self.mirror.metrics.value("mirrord_served_bytes_total", source="upstream")
        first = self.mirror.get(self.path, headers)  # the manifest: MISS
        self.mirror.get(self.path, headers)  # HIT
        blob = next(d for d in self.mirror.alpine.blobs if d != self.mirror.alpine.manifest_digest)
        size = len(self.mirror.alpine.blobs[blob])
        blob_path = f"/v2/library/alpine/blobs/{blob}"
        self.assertEqual(self.mirror.get(blob_path, headers).header("x-mirrord-cache"), "MISS")
        self.mirror.clock.advance(1)  # the fill publishes
        self.assertEqual(self.mirror.get(blob_path, headers).header("x-mirrord-cache"), "HIT")
        part = self.mirror.get(blob_path, {**headers, "Range": "bytes=10-19"})
        self.assertEqual((part.code, len(part.body)), (206, 10))
        self.mirror.request("HEAD", blob_path, headers)  # no body, no bytes
        self.hub.ratelimit = True
        limited = self.mirror.get("/v2/library/alpine/manifests/other", {**ACCEPT, **headers})
        self.assertEqual(limited.code, 429)
        text = self.mirror.get("/metrics").body.decode()
        samples = dict(re.findall(r"(?m)^(mirrord_\S+) (\S+)$", text))
        manifest = len(first.body)
        self.assertEqual(
            {name: float(value) for name, value in samples.items() if "served_bytes_total" in name},
            {
                # The 429's JSON body is relayed from upstream as well.
                'mirrord_served_bytes_total{source="upstream"}': before
                + manifest
                + size
                + len(limited.body),
                'mirrord_served_bytes_total{source="cache"}': manifest + size + 10,
            },
        )
        self.assertEqual(
            {name: float(value) for name, value in samples.items() if "rate_limited_total" in name},
            {'mirrord_upstream_rate_limited_total{upstream="http://hub.test"}': 1.0},
        )
        self.assertEqual(samples['mirrord_cache_results_total{result="HIT"}'], "4.0")  # HEAD too
        self.assertEqual(samples['mirrord_cache_results_total{result="MISS"}'], "2.0")
        quota = (
            'mirrord_upstream_ratelimit_remaining{identity="anonymous",upstream="http://hub.test"}'
        )
        self.assertIn(f"{quota} 99.0", text)
        self.assertEqual(samples["mirrord_cache_entries"], "2.0")
        # The status page says the same in words, once its minute is sampled.
        self.mirror.clock.advance(60)
        page = parse(self.mirror.get("/?lang=en").body).text
        upstream = float(samples['mirrord_served_bytes_total{source="upstream"}'])
        cache = float(samples['mirrord_served_bytes_total{source="cache"}'])
        self.assertRegex(
            page,
            rf"Last hour\s*67 % \(4 of 6\){human_bytes(cache)}{human_bytes(upstream)}",
        )


class PassThroughMetricsTests(SynchronousTestCase):
    def test_bytes_served_with_the_cache_off(self) -> None:
        """With the cache off /metrics still counts the bytes served (all from
        upstream), the upstream's remaining quota and the answers of a fallback."""
        mirror = MemoryMirror(
            self,
            Path(tempfile.mkdtemp()),
            upstreams=("http://hub.test", "http://second.test"),
            cache=None,
        )
        probe = mirror.get("/v2/")  # the challenge: its body is served too
        token = mirror.get("/token?service=fakehub&scope=repository:library/alpine:pull")
        headers = {"Authorization": f"Bearer {token.json()['token']}"}
        mirror.hub.ratelimit = True  # the manifest GET falls back to second.test
        manifest = mirror.get("/v2/library/alpine/manifests/latest", {**ACCEPT, **headers})
        self.assertEqual(manifest.code, 200)
        blob = next(d for d in mirror.alpine.blobs if d != mirror.alpine.manifest_digest)
        whole = mirror.get(f"/v2/library/alpine/blobs/{blob}", headers)
        part = mirror.get(f"/v2/library/alpine/blobs/{blob}", {**headers, "Range": "bytes=0-9"})
        self.assertEqual((whole.code, part.code, len(part.body)), (200, 206, 10))
        text = mirror.get("/metrics").body.decode()
        samples = dict(re.findall(r"(?m)^(mirrord_served_bytes_total\S*) (\S+)$", text))
        # Every body came from upstream (the probe's, the content's) but the
        # token's, which the mirror signed itself.
        served = len(probe.body) + len(manifest.body) + len(whole.body) + 10
        self.assertEqual(samples, {'mirrord_served_bytes_total{source="upstream"}': f"{served}.0"})
        quota = 'mirrord_upstream_ratelimit_remaining{identity="anonymous",upstream="http://second.test"}'
        self.assertIn(f"{quota} 99.0", text)
        # hub.test rests after its 429: the manifest and both blob GETs fell back.
        self.assertIn("mirrord_upstream_fallbacks_total 3.0", text)
        self.assertIn('mirrord_upstream_rate_limited_total{upstream="http://hub.test"} 1.0', text)


class RestartOrderTests(SynchronousTestCase):
    def test_access_order_survives_restart(self) -> None:
        """A blob used again outlives an untouched one in eviction, across a restart."""
        now = [1_000_000.0]
        root = Path(tempfile.mkdtemp())
        store = BlobStore(root, 1000, 0.9, 0.8, now=lambda: now[0])
        first, second = os.urandom(400), os.urandom(400)
        store.put_bytes(_digest(first), first, Meta())
        now[0] += 10
        store.put_bytes(_digest(second), second, Meta())
        now[0] += 7200
        store.get(_digest(first))
        now[0] += 10
        restarted = BlobStore(root, 1000, 0.9, 0.8, now=lambda: now[0])
        restarted.rebuild()
        restarted.put_bytes(_digest(b"x" * 300), b"x" * 300, Meta())
        self.assertEqual(restarted.evict(), [_digest(second)])


class TagPinTests(SynchronousTestCase):
    def test_pinned_tag_keeps_its_manifest_and_layers(self) -> None:
        """A pinned tag's manifest, config and layers survive eviction; the rest goes."""
        root = Path(tempfile.mkdtemp())
        now = [1000.0]
        store = BlobStore(root, 2000, 0.9, 0.3, ("library/app:1.*",), now=lambda: now[0])
        layer, config_blob = os.urandom(500), os.urandom(100)
        for data in (layer, config_blob):
            store.put_bytes(_digest(data), data, Meta(repository="library/app"))
            now[0] += 1
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"digest": _digest(config_blob)},
                "layers": [{"digest": _digest(layer)}],
            }
        ).encode()
        store.put_bytes(_digest(manifest), manifest, Meta(OCI_MANIFEST, "library/app"))
        TagStore(root).put(
            "docker.io",
            "library/app",
            "1.2",
            TagRecord(_digest(manifest), OCI_MANIFEST, len(manifest), now[0], True),
        )
        others = [os.urandom(600) for _ in range(2)]
        for data in others:
            now[0] += 1
            store.put_bytes(_digest(data), data, Meta(repository="library/other"))
        removed = store.evict()
        self.assertEqual(sorted(removed), sorted(_digest(d) for d in others))
        for data in (layer, config_blob, manifest):
            self.assertIsNotNone(store.get(_digest(data)))


class TagStoreTests(SynchronousTestCase):
    def test_unchanged_tag_is_not_rewritten_every_request(self) -> None:
        """Revalidating the same digest rewrites the tag file at most once a minute."""
        root = Path(tempfile.mkdtemp())
        tags = TagStore(root)
        path = root / "tags" / "docker.io" / "library" / "a" / "1.json"
        record = TagRecord("sha256:" + "a" * 64, OCI_MANIFEST, 10, 1000.0, True)
        tags.put("docker.io", "library/a", "1", record)
        inode = path.stat().st_ino
        tags.put("docker.io", "library/a", "1", dataclasses.replace(record, fetched=1030.0))
        self.assertEqual(path.stat().st_ino, inode)
        tags.put("docker.io", "library/a", "1", dataclasses.replace(record, fetched=1061.0))
        self.assertNotEqual(path.stat().st_ino, inode)
        self.assertEqual(TagStore(root).get("docker.io", "library/a", "1").fetched, 1061.0)
        moved = dataclasses.replace(record, digest="sha256:" + "b" * 64, fetched=1062.0)
        tags.put("docker.io", "library/a", "1", moved)
        self.assertEqual(TagStore(root).get("docker.io", "library/a", "1").digest, moved.digest)
