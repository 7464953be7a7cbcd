"""Counters and gauges, exported for Prometheus at ``/metrics`` and shown
on the usage page. Each daemon has its own registry (no global state).

prometheus_client adds a ``<name>_created`` sample (the counter's creation
time) to every counter; it is noise on a dashboard and doubles the series.
Its own switch (``disable_created_metrics``) is process-wide, so the
exposition filters them out of this daemon's registry instead."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET, Request

from mirrord.registry import errors
from mirrord.registry.respond import ReadOnlyResource, write_error


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
        self.resumes = Counter(
            "mirrord_fill_resumes",
            "Range requests made to resume a fill whose upstream body was cut",
            registry=r,
        )
        self.cache_size = Gauge("mirrord_cache_size_bytes", "Bytes in the blob cache", registry=r)
        self.cache_entries = Gauge("mirrord_cache_entries", "Blobs in the cache", registry=r)
        self.cache_limit = Gauge(
            "mirrord_cache_limit_bytes", "The cache's size limit (max_size)", registry=r
        )
        self.fills = Gauge(
            "mirrord_fills_in_progress",
            "Blobs being fetched from upstream into the cache",
            registry=r,
        )
        self.quota = Gauge(
            "mirrord_upstream_ratelimit_remaining",
            "Pulls left in the upstream's window (ratelimit-remaining), by identity",
            ["upstream", "identity"],
            registry=r,
        )

    def update_cache(self, store: Any) -> None:
        """The cache gauges from a ``BlobStore``."""
        self.cache_size.set(store.size)
        self.cache_entries.set(len(store.entries))

    def watch(self, store: Any, fills: Sized) -> None:
        """Read the cache gauges from ``store`` (a ``BlobStore``) and the
        fills in progress from ``fills`` at every scrape, so they are right
        from the start and never wait for a change to be pushed."""
        if store is not None:
            self.cache_size.set_function(lambda: store.size)
            self.cache_entries.set_function(lambda: len(store.entries))
            self.cache_limit.set_function(lambda: store.max_size)
        self.fills.set_function(lambda: len(fills))

    def saw_answer(self, answer: Any) -> None:
        """An upstream ``Answer``: its quota headers, and whether a fallback gave it."""
        self.saw_upstream_headers(answer.upstream, answer.headers, answer.identity or "clients")
        if answer.fell_back and answer.code not in (429, 502, 503, 504):
            self.fallbacks.inc()

    def saw_upstream_headers(
        self, upstream: str, headers: Headers, identity: str = "clients"
    ) -> None:
        """Docker Hub's remaining pull quota, from either header spelling, by
        whom it counts against: the mirror's account, "anonymous" (the
        mirror's address) or "clients" (their own credentials)."""
        for name in (b"ratelimit-remaining", b"x-ratelimit-remaining"):
            value = headers.getRawHeaders(name)
            if value:
                number = value[-1].split(b";", 1)[0].strip()
                if number.isdigit():
                    self.quota.labels(upstream, identity).set(int(number))
                return

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def exposition(self) -> bytes:
        """The Prometheus text format, without ``_created`` samples."""
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated:
    """A view of a registry whose counters, histograms and summaries have
    no ``_created`` sample."""

    _KINDS = frozenset({"counter", "histogram", "summary"})

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            if family.type in self._KINDS:
                created = family.name + "_created"
                family.samples = [s for s in family.samples if s.name != created]
            yield family


class MetricsResource(ReadOnlyResource):
    """``/metrics``, for the clients ``allows`` admits; the others get 403
    ``DENIED`` as a registry JSON error, like every refusal of the mirror."""

    isLeaf = True

    def __init__(
        self, metrics: Metrics, allows: Callable[[Request], bool] = lambda request: True
    ) -> None:
        super().__init__()
        self._metrics = metrics
        self._allows = allows

    def render_GET(self, request: Request) -> bytes | int:
        if not self._allows(request):
            write_error(request, errors.denied("metrics are not available to your address"))
            return NOT_DONE_YET
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return self._metrics.exposition()
