"""The usage page's status section, its language, and who may see the
figures (the page and /metrics), in memory on the test clock."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import tempfile
from pathlib import Path

import treq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mirrord.config import Access, CacheConfig, MetricsAccess
from mirrord.front.chart import human_bytes
from mirrord.front.history import History, Totals
from mirrord.front.texts import TEXTS
from mirrord.front.usage import COPY_SCRIPT
from mirrord.store.disk import Meta
from tests.support.blobs import PacedBlobs
from tests.support.images import OCI_MANIFEST
from tests.support.memory import MemoryMirror
from tests.support.page import parse

ACCEPT = {"Accept": [OCI_MANIFEST]}
EN = {"Accept-Language": "en-US,en;q=0.9"}


class Counters:
    """Cumulative totals a test moves by hand."""

    def __init__(self) -> None:
        self.now = Totals()

    def add(self, hits: int = 0, misses: int = 0, cache: int = 0, upstream: int = 0) -> None:
        n = self.now
        self.now = Totals(
            n.hits + hits,
            n.misses + misses,
            n.cache_bytes + cache,
            n.upstream_bytes + upstream,
        )


class HistoryTests(SynchronousTestCase):
    def history(self) -> tuple[History, Counters, Clock]:
        clock, counters = Clock(), Counters()
        history = History(lambda: counters.now, clock)
        history.startService()
        return history, counters, clock

    def test_one_sample_per_minute_of_the_clock(self) -> None:
        """Each minute of the injected clock keeps what happened in it, and nothing before."""
        history, counters, clock = self.history()
        counters.add(hits=5, cache=500)  # before the first minute ends
        clock.advance(59)
        self.assertEqual(len(history.samples), 0)
        clock.advance(1)
        counters.add(misses=2, upstream=70)
        clock.advance(60)
        self.assertEqual(
            [(s.hits, s.misses, s.cache_bytes, s.upstream_bytes) for s in history.samples],
            [(5, 0, 500, 0), (0, 2, 0, 70)],
        )

    def test_ring_holds_one_day(self) -> None:
        """After more than a day the ring holds exactly the last 1440 minutes."""
        history, counters, clock = self.history()
        for minute in range(1500):
            counters.add(upstream=minute)
            clock.advance(60)
        self.assertEqual(len(history.samples), 1440)
        self.assertEqual(history.samples[0].upstream_bytes, 60)
        self.assertEqual(history.samples[-1].upstream_bytes, 1499)
        self.assertEqual(history.total(24 * 60).upstream_bytes, sum(range(60, 1500)))

    def test_windows_and_buckets(self) -> None:
        """The last hour and day sum the right minutes; the day's buckets are hours, newest last."""
        history, counters, clock = self.history()
        counters.add(cache=1000)
        clock.advance(60)  # a minute that ends 2 h 59 min before the last
        clock.advance(3 * 3600 - 120)
        counters.add(cache=7, upstream=3)
        clock.advance(60)  # the last minute
        hour, day = history.total(60), history.total(24 * 60)
        self.assertEqual((hour.cache_bytes, hour.upstream_bytes), (7, 3))
        self.assertEqual((day.cache_bytes, day.upstream_bytes), (1007, 3))
        hours = [b.cache_bytes for b in history.buckets(24 * 60, 60)]
        self.assertEqual(len(hours), 24)
        self.assertEqual(hours[-1], 7)
        self.assertEqual(hours[-3], 1000)  # between 2 and 3 hours ago
        self.assertEqual(sum(hours), 1007)
        minutes = history.buckets(60, 1)
        self.assertEqual([m.upstream_bytes for m in minutes][-1], 3)
        self.assertEqual(sum(m.cache_bytes for m in minutes), 7)

    def test_minute_under_way_counts(self) -> None:
        """What happened since the last sample is in the windows at once, not a minute later."""
        history, counters, clock = self.history()
        clock.advance(60)
        counters.add(hits=1, misses=1, upstream=42)
        clock.advance(30)
        hour = history.total(60)
        self.assertEqual((hour.hits, hour.misses, hour.upstream_bytes), (1, 1, 42))
        self.assertEqual(history.buckets(60, 1)[-1].upstream_bytes, 42)
        clock.advance(30)  # the sample takes it: counted once, not twice
        self.assertEqual(history.total(60).upstream_bytes, 42)

    def test_a_clock_that_moves_while_reading(self) -> None:
        """With a real clock, time passes between reads: the minute under way still counts."""

        class Creeping(Clock):
            def seconds(self) -> float:
                self.rightNow += 0.001
                return self.rightNow

        clock, counters = Creeping(), Counters()
        history = History(lambda: counters.now, clock)
        history.startService()
        counters.add(hits=2, cache=10)
        self.assertEqual(history.total(60).cache_bytes, 10)
        self.assertEqual(history.buckets(24 * 60, 60)[-1].hits, 2)

    def test_stops_with_the_service(self) -> None:
        """A stopped history leaves nothing scheduled on the clock."""
        history, _, clock = self.history()
        history.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])


class ChartTests(SynchronousTestCase):
    def test_human_bytes(self) -> None:
        """Sizes read as people write them, in binary units."""
        self.assertEqual(
            [human_bytes(v) for v in (0, 1023, 1536, 50 << 30, 3 << 40)],
            ["0 B", "1023 B", "1.5 KiB", "50 GiB", "3 TiB"],
        )


class StatusPageTests(SynchronousTestCase):
    def mirror(self, **kwargs: object) -> MemoryMirror:
        kwargs.setdefault("cache", CacheConfig(tag_ttl=0, max_size=1 << 20))
        return MemoryMirror(self, Path(tempfile.mkdtemp()), **kwargs)  # type: ignore[arg-type]

    def page(self, mirror: MemoryMirror, query: str = "?lang=en", **headers: str) -> str:
        reply = mirror.get("/" + query, {"Host": "mirror.example.com", **headers})
        self.assertEqual(reply.code, 200)
        return parse(reply.body).text

    def test_figures_in_human_terms(self) -> None:
        """After a miss and two hits the page shows cache use, hit ratio and bytes by source."""
        mirror = self.mirror()
        headers = {**ACCEPT, **mirror.pull_headers("library/alpine")}
        blob = next(d for d in mirror.alpine.blobs if d != mirror.alpine.manifest_digest)
        sizes = []
        for _ in range(3):
            sizes.append(len(mirror.get(f"/v2/library/alpine/blobs/{blob}", headers).body))
            mirror.clock.advance(60)
        text = self.page(mirror)
        store = mirror.store
        assert store is not None
        self.assertIn(f"{human_bytes(store.size)} of 1 MiB used", text)
        self.assertIn(f"{len(store.entries)} blobs", text)
        self.assertRegex(text, r"Last hour\s*67 % \(2 of 3\)")
        self.assertRegex(text, r"Last 24 hours\s*67 % \(2 of 3\)")
        # Two hits of the blob came from the cache.
        self.assertRegex(text, rf"Last hour\s*67 % \(2 of 3\){human_bytes(2 * sizes[0])}")
        body = mirror.get("/?lang=en").body.decode()
        self.assertEqual(body.count('<svg class="chart"'), 2)
        # The hour's chart has bars in its last three minutes.
        hour = body[body.index('<svg class="chart"') :]
        hour = hour[: hour.index("</svg>")]
        self.assertGreaterEqual(hour.count("<rect"), 3)

    def test_upstream_resting_and_quota(self) -> None:
        """A rate-limited upstream shows when its rest ends; Docker Hub's quota is shown."""
        mirror = MemoryMirror(
            self,
            Path(tempfile.mkdtemp()),
            upstreams=("http://hub.test", "http://second.test"),
            cache=None,
        )
        headers = {**ACCEPT, **mirror.pull_headers("library/alpine")}
        mirror.hub.ratelimit = True
        mirror.hub.retry_after = 600
        self.assertEqual(mirror.get("/v2/library/alpine/manifests/latest", headers).code, 200)
        text = self.page(mirror)
        # The clock started at 0: the rest ends 600 s after it.
        self.assertIn("http://hub.test: resting until 1970-01-01 00:10:00 UTC (600 s left", text)
        self.assertIn("http://second.test: healthy; pulls left for anonymous: 99", text)
        self.assertIn("http://second.test: healthy", text)
        mirror.clock.advance(601)
        self.assertIn("http://hub.test: healthy", self.page(mirror))

    def test_fills_in_progress(self) -> None:
        """A blob being fetched shows as a fill in progress until it is complete."""
        mirror = self.mirror()
        data = os.urandom(300_000)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        gate = PacedBlobs({digest: data})
        gate.hold_at = 100_000
        mirror.add_host(b"gate.test", gate)
        mirror.wiring.targets["docker.io"].chain.set_urls(["http://gate.test"])
        self.assertRegex(self.page(mirror), r"Fills in progress\s*0")
        d = mirror.client.get(f"https://mirror.test/v2/library/x/blobs/{digest}")
        d.addCallback(treq.content)
        mirror.settle()
        self.assertRegex(self.page(mirror), r"Fills in progress\s*1")
        self.assertIn("\nmirrord_fills_in_progress 1.0\n", mirror.get("/metrics").body.decode())
        gate.release()
        mirror.settle()
        self.assertEqual(self.successResultOf(d), data)
        mirror.clock.advance(1)  # publication waits a moment for the readers (PUBLISH_DELAY)
        mirror.settle()
        self.assertRegex(self.page(mirror), r"Fills in progress\s*0")

    def test_cache_off(self) -> None:
        """With the cache off the page says so instead of a size."""
        mirror = self.mirror(cache=None)
        self.assertIn("off: every request goes upstream", self.page(mirror))


class LanguageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.mirror = MemoryMirror(self, Path(tempfile.mkdtemp()))

    def lang(self, query: str = "", **headers: str) -> str:
        body = self.mirror.get("/" + query, headers).body.decode()
        match = re.match(r"<!doctype html><html lang='([^']+)'>", body)
        assert match is not None, body[:100]
        return match.group(1)

    def test_accept_language_decides(self) -> None:
        """zh* gets Chinese, en* English, by preference; ?lang= overrides; no header is Chinese."""
        self.assertEqual(self.lang(), "zh-CN")
        self.assertEqual(self.lang(**{"Accept-Language": "zh-TW,zh;q=0.9"}), "zh-CN")
        self.assertEqual(self.lang(**{"Accept-Language": "en-GB"}), "en")
        self.assertEqual(self.lang(**{"Accept-Language": "fr, en;q=0.5, zh;q=0.4"}), "en")
        self.assertEqual(self.lang(**{"Accept-Language": "en;q=0.1, zh-CN;q=0.8"}), "zh-CN")
        self.assertEqual(self.lang(**{"Accept-Language": "zh;q=0, en;q=0.2"}), "en")
        self.assertEqual(self.lang("?lang=en", **{"Accept-Language": "zh-CN"}), "en")
        self.assertEqual(self.lang("?lang=zh", **EN), "zh-CN")
        self.assertEqual(self.lang("?lang=<b>", **EN), "en")

    def test_every_text_in_both_languages(self) -> None:
        """The Chinese page shows Chinese texts, the switch to English, and no English label."""
        self.assertEqual(set(TEXTS["zh"]), set(TEXTS["en"]))
        text = parse(self.mirror.get("/", {"Host": "mirror.example.com"}).body).text
        for key in ("pull_directly", "status", "hit_ratio", "upstreams", "fills", "last_hour"):
            self.assertIn(TEXTS["zh"][key], text)
            self.assertNotIn(TEXTS["en"][key], text)
        self.assertIn("English", text)
        reply = self.mirror.get("/")
        self.assertEqual(reply.header("vary"), "Accept-Language")

    def test_copy_buttons_need_only_the_allowed_script(self) -> None:
        """Every snippet has a copy button, hidden without JavaScript; the CSP
        allows exactly the page's one script, by its hash."""
        reply = self.mirror.get("/", EN)
        body = reply.body.decode()
        self.assertEqual(
            body.count("<pre>"), body.count('<button type="button" class="copy" hidden')
        )
        self.assertGreater(body.count("<pre>"), 3)
        digest = base64.b64encode(hashlib.sha256(COPY_SCRIPT.encode()).digest()).decode()
        policy = reply.header("content-security-policy") or ""
        self.assertIn(f"script-src 'sha256-{digest}'", policy)
        self.assertIn("default-src 'none'", policy)
        self.assertEqual(parse(reply.body).scripts, [COPY_SCRIPT])


class FiguresAccessTests(SynchronousTestCase):
    def test_default_is_loopback_only(self) -> None:
        """By default a loopback client sees figures and /metrics; the client setup is public."""
        mirror = MemoryMirror(self, Path(tempfile.mkdtemp()))
        self.assertIn('id="status"', mirror.get("/", EN).body.decode())
        metrics = mirror.get("/metrics")
        self.assertEqual(metrics.code, 200)
        self.assertIn(b"mirrord_requests_total", metrics.body)

    def test_others_get_the_setup_without_figures(self) -> None:
        """A client outside [metrics] allow gets the setup without figures, and 403 on /metrics."""
        mirror = MemoryMirror(
            self, Path(tempfile.mkdtemp()), metrics=MetricsAccess(allow=("10.0.0.0/8",))
        )
        page = mirror.get("/", EN)
        self.assertEqual(page.code, 200)
        body = page.body.decode()
        self.assertIn("docker pull mirror.test/library/alpine", body)
        self.assertNotIn('id="status"', body)
        self.assertNotIn("<svg", body)
        self.assertNotIn("http://hub.test: healthy", parse(page.body).text)
        metrics = mirror.get("/metrics")
        self.assertEqual(metrics.code, 403)
        self.assertEqual(metrics.json()["errors"][0]["code"], "DENIED")
        self.assertNotIn(b"mirrord_", metrics.body)

    def test_address_through_a_trusted_proxy(self) -> None:
        """Behind a trusted proxy the forwarded address decides, not the proxy's."""
        mirror = MemoryMirror(
            self,
            Path(tempfile.mkdtemp()),
            access=Access(trusted_proxies=("127.0.0.1",)),
            metrics=MetricsAccess(allow=("10.0.0.0/8",)),
        )
        inside = {"X-Forwarded-For": "10.1.2.3"}
        outside = {"X-Forwarded-For": "192.0.2.7"}
        self.assertEqual(mirror.get("/metrics", inside).code, 200)
        self.assertEqual(mirror.get("/metrics", outside).code, 403)
        self.assertIn('id="status"', mirror.get("/", inside).body.decode())
        self.assertNotIn('id="status"', mirror.get("/", outside).body.decode())

    def test_cache_gauges_read_at_scrape(self) -> None:
        """/metrics reports what the cache holds now (after a restart's rebuild
        too), its limit and the fills in progress, without waiting for a change."""
        mirror = MemoryMirror(
            self, Path(tempfile.mkdtemp()), cache=CacheConfig(max_size=5 << 20, tag_ttl=0)
        )
        store = mirror.store
        assert store is not None
        data = os.urandom(1000)
        store.put_bytes("sha256:" + hashlib.sha256(data).hexdigest(), data, Meta())
        found = re.findall(r"(?m)^(mirrord_cache_\S+|mirrord_fills\S+) (\S+)$", self.scrape(mirror))
        self.assertEqual(
            {name: float(value) for name, value in found},
            {
                "mirrord_cache_size_bytes": 1000,
                "mirrord_cache_entries": 1,
                "mirrord_cache_limit_bytes": 5 << 20,
                "mirrord_fills_in_progress": 0,
            },
        )

    def scrape(self, mirror: MemoryMirror) -> str:
        reply = mirror.get("/metrics")
        self.assertEqual(reply.code, 200)
        return reply.body.decode()

    def test_no_created_series(self) -> None:
        """/metrics has every counter's _total and no prometheus_client _created series."""
        mirror = MemoryMirror(self, Path(tempfile.mkdtemp()))
        mirror.pull_headers("library/alpine")
        body = mirror.get("/metrics").body.decode()
        self.assertIn("mirrord_requests_total{", body)
        self.assertIn("mirrord_served_bytes_total{", body)
        self.assertNotIn("_created", body)
