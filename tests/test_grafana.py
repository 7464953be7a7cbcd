"""The Grafana dashboard in contrib/ asks only for series /metrics really
has: every metric name (with its _total suffix) and every label an
expression names, checked against a live scrape of the in-memory mirror."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from mirrord.config import CacheConfig
from tests.support.images import OCI_MANIFEST
from tests.support.memory import MemoryMirror

DASHBOARD = Path(__file__).resolve().parents[1] / "contrib" / "grafana" / "mirrord.json"
ACCEPT = {"Accept": [OCI_MANIFEST]}

# PromQL words that look like names but are not series.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
KEYWORDS |= {"and", "or", "unless", "inf", "nan"}


def expressions(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, labels its matcher names) for every series an expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings cannot hide names
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges: [5m], [$__rate_interval]
    # Label lists: sum by (source) (...), a / on (x) b.
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    found = []
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?\s*(\()?", expr):
        name, matcher, call = match.groups()
        if call or name in KEYWORDS:
            continue  # a function or aggregation, or a keyword
        labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*!?=~?", matcher or ""))
        found.append((name, labels))
    return found


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip()
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
        for label in group.split(",")
        if label.strip()
    }


class DashboardTests(SynchronousTestCase):
    def scrape(self) -> dict[str, set[str]]:
        """Sample name -> its label names, after traffic that touches every series."""
        mirror = MemoryMirror(
            self,
            Path(tempfile.mkdtemp()),
            upstreams=("http://hub.test", "http://second.test"),
            cache=CacheConfig(tag_ttl=0),
        )
        headers = {**ACCEPT, **mirror.pull_headers("library/alpine")}
        blob = next(d for d in mirror.alpine.blobs if d != mirror.alpine.manifest_digest)
        for _ in range(2):
            self.assertEqual(mirror.get("/v2/library/alpine/manifests/latest", headers).code, 200)
            self.assertEqual(mirror.get(f"/v2/library/alpine/blobs/{blob}", headers).code, 200)
            mirror.clock.advance(1)
        mirror.hub.ratelimit = True  # an uncached tag's GET goes to the fallback
        mirror.get("/v2/library/alpine/manifests/other", headers)
        text = mirror.get("/metrics").body.decode()
        series: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                series.setdefault(sample.name, set()).update(sample.labels)
        return series

    def test_every_expression_reads_existing_series(self) -> None:
        """Every metric and label the dashboard's expressions name is in a live /metrics."""
        dashboard = json.loads(DASHBOARD.read_text())
        exprs = expressions(dashboard)
        self.assertGreaterEqual(len(exprs), 10)
        series = self.scrape()
        used = set()
        for expr in exprs:
            with self.subTest(expr=expr):
                found = selectors(expr)
                self.assertTrue(found, "no metric found in the expression")
                for name, labels in found:
                    self.assertIn(name, series, f"{name} is not in /metrics")
                    self.assertLessEqual(labels, series[name], f"{name} has no such label")
                    used.add(name)
                for label in grouping_labels(expr):
                    self.assertTrue(
                        any(label in series[name] for name, _ in found),
                        f"no metric of the expression has the label {label!r}",
                    )
        # Every series mirrord exports has a panel.
        self.assertEqual(set(series) - used, set())

    def test_the_parser_sees_names_and_labels(self) -> None:
        """The expression reader finds series, not functions, keywords or grouping labels."""
        self.assertEqual(
            selectors(
                'sum by (source) (rate(mirrord_served_bytes_total{source="a b"}[5m]))'
                " / on () mirrord_cache_entries"
            ),
            [("mirrord_served_bytes_total", {"source"}), ("mirrord_cache_entries", set())],
        )
        self.assertEqual(grouping_labels("sum by (kind, x) (rate(m[1m]))"), {"kind", "x"})

    def test_a_wrong_name_is_caught(self) -> None:
        """A counter named without its _total suffix is not a series /metrics has."""
        series = self.scrape()
        self.assertNotIn("mirrord_requests", series)
        self.assertIn("mirrord_requests_total", series)
        self.assertNotIn("mirrord_requests_created", series)
