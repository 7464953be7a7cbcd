"""Warming the cache: the puller through the real site in memory, in front
of the fake Hub, and the service's schedule on a ``task.Clock``."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mirrord.config import CacheConfig
from mirrord.daemon.warm import WarmService
from mirrord.registry.imageref import parse_image
from mirrord.warm import MANIFEST_TYPES, Pulled, Puller, Terminal, WarmError, pull_all, reason
from tests.support import images
from tests.support.memory import MIRROR, MemoryMirror

ACCEPT = {"Accept": ", ".join(MANIFEST_TYPES)}


class WarmTests(SynchronousTestCase):
    def setUp(self) -> None:
        tmp = Path(tempfile.mkdtemp())
        self.mirror = MemoryMirror(self, tmp, cache=CacheConfig(tag_ttl=0))
        self.hub = self.mirror.hub
        self.multi = images.multi_arch(tmp / "multi")
        self.hub.add("library/multi", self.multi)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def puller(self, **kwargs: Any) -> Puller:
        # The test client's agent: the daemon's own site, its channel and
        # resource tree, exactly what a client's request goes through.
        # Longer than the mirror's own wait upstream (30 s), as in the daemon.
        kwargs.setdefault("timeout", 120)
        return Puller(self.mirror.client._agent, self.mirror.clock, MIRROR, **kwargs)

    def wait(self, d: Deferred[Any]) -> Any:
        for _ in range(200):
            if d.called:
                break
            self.mirror.settle()
        return self.successResultOf(d)

    def logged(self, text: str) -> list[dict[str, Any]]:
        return [e for e in self.events if text in e.get("log_format", "")]

    def test_warm_run_caches_every_platform(self) -> None:
        """After warming a multi-arch tag, all its platforms' content is a HIT, none upstream."""
        seen: list[tuple[str, str]] = []
        puller = self.puller(progress=lambda image, what, digest, size: seen.append((what, digest)))
        pulled = self.wait(puller.pull(parse_image("library/multi:latest")))
        self.assertEqual(pulled.manifests, 3)  # the index and two platforms
        blobs = set(self.multi.blobs) - {d for what, d in seen if what == "manifest"}
        self.assertEqual(pulled.blobs, 4)  # a config and a layer per platform
        self.assertEqual({d for what, d in seen if what == "blob"}, blobs)
        self.assertEqual(pulled.bytes, sum(len(self.multi.blobs[d]) for d in blobs))
        self.mirror.clock.advance(1)  # the fills publish just after their last byte
        self.mirror.settle()

        self.hub.counts.clear()
        headers = {**ACCEPT, **self.mirror.pull_headers("library/multi")}
        for digest, data in self.multi.blobs.items():
            kind = "blobs" if digest in blobs else "manifests"
            reply = self.mirror.get(f"/v2/library/multi/{kind}/{digest}", headers)
            self.assertEqual(reply.code, 200, digest)
            self.assertEqual(reply.body, data)
            self.assertEqual(reply.header("x-mirrord-cache"), "HIT", digest)
        self.assertEqual(self.hub.counts["requests"], 0, self.hub.counts)
        self.assertEqual(self.hub.counts["cdn GET"], 0, self.hub.counts)

    def test_warm_pull_is_counted_like_a_client_pull(self) -> None:
        """A warm pull shows in /metrics as cache MISSes and bytes served, as a client's would."""
        self.wait(self.puller().pull(parse_image("library/alpine:latest")))
        metrics = self.mirror.get("/metrics").body.decode().splitlines()

        def value(name: str) -> float:
            return sum(float(line.split()[-1]) for line in metrics if line.startswith(name))

        self.assertEqual(
            value('mirrord_cache_results_total{result="MISS"}'), 4
        )  # manifest, 3 blobs
        size = sum(len(data) for data in self.mirror.alpine.blobs.values())
        self.assertGreaterEqual(value('mirrord_served_bytes_total{source="upstream"}'), size)

    def test_failing_image_is_logged_and_others_go_on(self) -> None:
        """An image the hub lacks is logged with the reason; the next one is still warmed."""
        service = WarmService(
            [parse_image("library/missing:1"), parse_image("library/alpine:latest")],
            3600,
            self.mirror.clock,
            self.puller,
        )
        service.startService()
        self.addCleanup(service.stopService)
        self.mirror.clock.advance(0)
        for _ in range(100):
            self.mirror.settle()
        failed = self.logged("warming {image} failed")
        self.assertEqual([e["image"] for e in failed], ["library/missing:1"])
        self.assertIn("404 NAME_UNKNOWN", failed[0]["reason"])
        warmed = self.logged("warmed {image}")
        self.assertEqual([e["image"] for e in warmed], ["library/alpine:latest"])
        self.assertEqual(warmed[0]["blobs"], len(self.mirror.alpine.blobs) - 1)

    def test_interval_reruns_and_never_overlaps(self) -> None:
        """Runs come every warm_interval; one still under way holds the next back until it ends."""
        service = WarmService(
            [parse_image("library/alpine:latest")], 10, self.mirror.clock, self.puller
        )
        service.startService()
        self.addCleanup(service.stopService)
        clock = self.mirror.clock
        clock.advance(0)
        for _ in range(50):
            self.mirror.settle()
        self.assertEqual(service.runs, 1)
        self.assertEqual(len(self.logged("warmed {image}")), 1)
        clock.advance(9)
        self.assertEqual(service.runs, 1)
        heads = self.hub.counts["HEAD manifests"]
        clock.advance(1)
        for _ in range(50):
            self.mirror.settle()
        self.assertEqual(service.runs, 2)
        self.assertEqual(len(self.logged("warmed {image}")), 2)
        self.assertEqual(self.hub.counts["HEAD manifests"], heads + 1)  # the tag revalidated

        # A run held up upstream (the mirror waits 30 s for Hub's answer):
        # the next is not started beside it, but as soon as it ends.
        self.hub.hang = True
        clock.advance(10)
        for _ in range(20):
            self.mirror.settle()
        self.assertEqual(service.runs, 3)
        clock.advance(20)
        self.assertEqual(service.runs, 3)
        self.assertIsNotNone(service._run)
        for _ in range(4):  # the mirror gives up on Hub and serves the cached tag
            clock.advance(10)
            for _ in range(50):
                self.mirror.settle()
        self.assertEqual(len(self.logged("warmed {image}")), 3)
        self.assertEqual(service.runs, 4)

    def test_stop_cancels_the_run_in_flight(self) -> None:
        """Stopping while a warm request waits on upstream cancels it and logs no failure."""
        self.hub.hang = True
        service = WarmService(
            [parse_image("library/alpine:latest")], 100, self.mirror.clock, self.puller
        )
        service.startService()
        self.mirror.clock.advance(0)
        for _ in range(20):
            self.mirror.settle()
        site = self.mirror.wiring.site
        self.assertEqual(len(site.active), 1)  # the manifest request, waiting on Hub
        run = service._run
        self.assertIsNotNone(run)
        service.stopService()
        self.mirror.settle()
        self.assertEqual(len(site.active), 0)  # the client side went away
        self.assertIsNone(service._run)
        self.assertIsNone(service._next)
        self.assertEqual(self.logged("warming {image} failed"), [])
        self.assertEqual(self.logged("warm run failed"), [])

    def test_headers_wait_is_bounded_on_the_clock(self) -> None:
        """A pull whose answer does not come within its timeout fails as timed out."""
        self.hub.hang = True
        d = self.puller(timeout=5).pull(parse_image("library/alpine:latest"))
        for _ in range(20):
            self.mirror.settle()
        self.assertNoResult(d)
        self.mirror.clock.advance(5)
        self.mirror.settle()
        failure = self.failureResultOf(d, WarmError)
        self.assertEqual(reason(failure), "timed out: no answer to https://mirror.test/v2/ in 5s")

    def test_pull_all_goes_on_after_a_failure(self) -> None:
        """pull_all reports each image: a failure for the missing one, the pull for the next."""
        missing, alpine = parse_image("library/missing:1"), parse_image("library/alpine:latest")
        results = self.wait(pull_all(self.puller(), [missing, alpine]))
        self.assertIsInstance(results[missing], Failure)
        self.assertIsInstance(results[alpine], Pulled)


class TerminalTests(SynchronousTestCase):
    def test_plain_lines_off_a_terminal(self) -> None:
        """Off a terminal, progress is one plain line per blob and a summary line per image."""
        out = io.StringIO()
        terminal = Terminal(out)
        image = parse_image("library/alpine:3.20")
        terminal.progress(image, "blob", "sha256:" + "a" * 64, 10)
        terminal.done(image, Pulled(image, 1, 1, 10))
        self.assertEqual(
            out.getvalue().splitlines(),
            [
                f"library/alpine:3.20: blob sha256:{'a' * 64} 10 bytes",
                "library/alpine:3.20: ok, 1 manifests, 1 blobs, 10 bytes",
            ],
        )
        self.assertNotIn("\r", out.getvalue())

    def test_one_updating_line_on_a_terminal(self) -> None:
        """On a terminal, progress rewrites one line in place; each image ends on its own line."""

        class Tty(io.StringIO):
            def isatty(self) -> bool:
                return True

        out = Tty()
        terminal = Terminal(out)
        image = parse_image("library/alpine:3.20")
        for size in (10, 20):
            terminal.progress(image, "blob", "sha256:" + "a" * 64, size)
        terminal.done(image, Pulled(image, 1, 2, 30))
        text = out.getvalue()
        self.assertEqual(text.count("\n"), 1)
        self.assertEqual(text.count("\r\x1b[K"), 3)
        self.assertIn("(total 30)", text)
        self.assertTrue(
            text.endswith("\r\x1b[Klibrary/alpine:3.20: ok, 1 manifests, 2 blobs, 30 bytes\n")
        )
