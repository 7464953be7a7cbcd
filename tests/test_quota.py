"""Quota-aware routing: when an upstream's remaining pull quota for the
mirror's identity falls to the reserve, the mirror's manifest GETs go to
the next upstream before a 429 happens; HEADs, free, still go first."""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.support.images import OCI_MANIFEST
from tests.support.memory import MemoryMirror

ACCEPT = {"Accept": [OCI_MANIFEST]}
ALPINE = "/v2/library/alpine/manifests/latest"


class QuotaTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.mirror = MemoryMirror(
            self,
            Path(tempfile.mkdtemp()),
            upstreams=("http://hub.test", "http://second.test"),
            cache=None,
            quota_reserve=3,
        )
        self.hub = self.mirror.hub
        self.hub.enforce_quota, self.hub.quota = True, 10
        self.headers = {**ACCEPT, **self.mirror.pull_headers("library/alpine")}

    def test_gets_move_on_at_the_reserve_before_any_429(self) -> None:
        for _ in range(12):
            self.assertEqual(self.mirror.get(ALPINE, self.headers).code, 200)
        self.assertEqual(self.hub.pulls["anonymous"], 7)  # 10 - 7 = 3 left: the reserve
        self.assertEqual(self.mirror.second.counts["GET manifests"], 5)
        self.assertEqual(self.hub.counts["429"], 0)
        heads = self.hub.counts["HEAD manifests"]
        self.assertEqual(self.mirror.request("HEAD", ALPINE, self.headers).code, 200)
        self.assertEqual(self.hub.counts["HEAD manifests"], heads + 1)
        value = self.mirror.metrics.value
        self.assertEqual(
            value(
                "mirrord_upstream_ratelimit_remaining",
                upstream="http://hub.test",
                identity="anonymous",
            ),
            3,
        )

    def test_quota_coming_back_brings_gets_back(self) -> None:
        """A HEAD that shows the window refilled sends GETs to the first upstream again."""
        for _ in range(8):
            self.mirror.get(ALPINE, self.headers)
        self.assertEqual(self.mirror.second.counts["GET manifests"], 1)
        self.hub.pulls.clear()  # the window moved on
        self.mirror.request("HEAD", ALPINE, self.headers)
        self.mirror.get(ALPINE, self.headers)
        self.assertEqual(self.hub.pulls["anonymous"], 1)
