"""Counters and gauges, exported for Prometheus at ``/metrics`` and shown
on the usage page. Each daemon has its own registry (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from mirrord.respond import ReadOnlyResource


class Metrics:
    """Everything mirrord counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mirrord_requests", "Registry requests by kind", ["kind"], registry=r
        )
        self.cache = Counter(
            "mirrord_cache_results",
            "Cache results (HIT, MISS, COALESCED, STALE)",
            ["result"],
            registry=r,
        )
        self.bytes_served = Counter(
            "mirrord_served_bytes", "Body bytes sent to clients by source", ["source"], registry=r
        )
        self.upstream_429 = Counter(
            "mirrord_upstream_rate_limited", "429 answers from upstreams", ["upstream"], registry=r
        )
        self.fallbacks = Counter(
            "mirrord_upstream_fallbacks", "Requests answered by a fallback upstream", registry=r
        )
        self.mismatches = Counter(
            "mirrord_digest_mismatches",
            "Upstream bodies that did not match their digest",
            registry=r,
        )
        self.cache_size = Gauge("mirrord_cache_size_bytes", "Bytes in the blob cache", registry=r)
        self.cache_entries = Gauge("mirrord_cache_entries", "Blobs in the cache", registry=r)
        self.quota = Gauge(
            "mirrord_upstream_ratelimit_remaining",
            "Pulls left in the upstream's window (ratelimit-remaining)",
            ["upstream"],
            registry=r,
        )

    def saw_upstream_headers(self, upstream: str, headers: Headers) -> None:
        """Docker Hub's remaining pull quota, from either header spelling."""
        for name in (b"ratelimit-remaining", b"x-ratelimit-remaining"):
            value = headers.getRawHeaders(name)
            if value:
                number = value[-1].split(b";", 1)[0].strip()
                if number.isdigit():
                    self.quota.labels(upstream).set(int(number))
                return

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def summary(self) -> dict[str, float]:
        """The figures the usage page shows."""
        out = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                label = ",".join(f"{k}={v}" for k, v in sample.labels.items())
                out[sample.name + (f"{{{label}}}" if label else "")] = sample.value
        return out


class MetricsResource(ReadOnlyResource):
    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return generate_latest(self._metrics.registry)
