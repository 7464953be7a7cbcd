"""Counters and gauges, exported for Prometheus at ``/metrics`` and shown
on the usage page. Each daemon has its own registry (no global state).

Worker processes keep one stream: with ``multiprocess_dir`` set, every
value lives in prometheus_client's per-process files there (its
multiprocess mode, which the supervisor turns on through
``PROMETHEUS_MULTIPROC_DIR`` before a worker imports anything), and every
read (``/metrics``, the usage page, the status history) sums all workers'
files: the same totals whichever worker answers. What a worker cannot push
into a file is read at scrape time instead: the cache gauges from the
store, which all workers share. A dead worker's counters stay in the sums
(merged into one archive file per kind); its share of the fills in
progress goes (``worker_died``).

prometheus_client adds a ``<name>_created`` sample (the counter's creation
time) to every counter; it is noise on a dashboard and doubles the series.
Its own switch (``disable_created_metrics``) is process-wide, so the
exposition filters them out of this daemon's registry instead."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sized
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, values
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET, Request

from mirrord.metricsarchive import LockedCollector, archive_dead
from mirrord.registry import errors
from mirrord.registry.respond import ReadOnlyResource, write_error


class Metrics:
    """Everything mirrord counts. ``multiprocess_dir``: where the workers'
    values are (see the module's docstring); None in the one process."""

    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self._shared = multiprocess_dir is not None
        # Where the metric objects live; what is read is ``registry``.
        r = CollectorRegistry()
        self.registry = r
        if multiprocess_dir is not None:
            _use_multiprocess(multiprocess_dir)
            self.registry = CollectorRegistry()
            LockedCollector(self.registry, multiprocess_dir)
            self.registry.register(_CacheGauges(self))
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
        self.shared_errors = Counter(
            "mirrord_shared_store_errors",
            "Shared store (S3) calls that failed, timed out or were skipped by its breaker",
            registry=r,
        )
        # Workers read these from the shared store at scrape time
        # (``_CacheGauges``): a gauge object would write a file of its own.
        self.cache_size: Gauge | None = None
        self.cache_entries: Gauge | None = None
        self.cache_limit: Gauge | None = None
        if not self._shared:
            self.cache_size = Gauge(*_CACHE_SIZE, registry=r)
            self.cache_entries = Gauge(*_CACHE_ENTRIES, registry=r)
            self.cache_limit = Gauge(*_CACHE_LIMIT, registry=r)
        # Summed over the live workers; a dead worker's share goes with it.
        self.fills = Gauge(
            "mirrord_fills_in_progress",
            "Blobs being fetched from upstream into the cache",
            registry=r,
            multiprocess_mode="livesum",
        )
        # The last answer seen by any worker is the upstream's word.
        self.quota = Gauge(
            "mirrord_upstream_ratelimit_remaining",
            "Pulls left in the upstream's window (ratelimit-remaining), by identity",
            ["upstream", "identity"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self._store: Any = None
        self._fleet_registered = False
        self._fills: Sized = ()
        self._published = -1

    @property
    def shared(self) -> bool:
        """True in a worker: the figures are all workers' sums."""
        return self._shared

    def watch_fleet(self, status: Any) -> None:
        """Report the shared store's and the fleet's state (a
        ``mirrord.fleet.status.FleetStatus``) at every scrape."""
        if not self._fleet_registered:
            self.registry.register(status)
            self._fleet_registered = True

    def update_cache(self, store: Any) -> None:
        """The cache gauges from a ``BlobStore``; with workers, this
        worker's fills in progress (called when a fill settles or ends)."""
        if self._shared:
            self._publish_fills()
            return
        assert self.cache_size is not None and self.cache_entries is not None
        self.cache_size.set(store.size)
        self.cache_entries.set(len(store.entries))

    def _publish_fills(self) -> None:
        count = len(self._fills)
        if count != self._published:  # a write only when it changed
            self.fills.set(count)
            self._published = count

    def watch(self, store: Any, fills: Sized) -> None:
        """Read the cache gauges from ``store`` (a ``BlobStore``) and the
        fills in progress from ``fills`` at every scrape, so they are right
        from the start and never wait for a change to be pushed."""
        self._store, self._fills = store, fills
        if self._shared:
            self._publish_fills()
            return
        assert self.cache_size and self.cache_entries and self.cache_limit
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
        if self._shared:
            self._publish_fills()
        return self.registry.get_sample_value(name, labels) or 0.0

    def quotas(self) -> dict[tuple[str, str], int]:
        """Pulls left by (upstream, identity): the last answer any worker saw."""
        return {
            (sample.labels["upstream"], sample.labels["identity"]): int(sample.value)
            for family in self.registry.collect()
            if family.name == "mirrord_upstream_ratelimit_remaining"
            for sample in family.samples
        }

    def reader(self) -> Callable[..., float]:
        """``value`` over one reading of every sample: with workers, one
        pass over their files for several figures, not one per figure."""
        if self._shared:
            self._publish_fills()
        found = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in self.registry.collect()
            for sample in family.samples
        }

        def value(name: str, **labels: str) -> float:
            return found.get((name, tuple(sorted(labels.items()))), 0.0)

        return value

    def exposition(self) -> bytes:
        """The Prometheus text format, without ``_created`` samples."""
        if self._shared:
            self._publish_fills()
        return generate_latest(_WithoutCreated(self.registry))


_CACHE_SIZE = ("mirrord_cache_size_bytes", "Bytes in the blob cache")
_CACHE_ENTRIES = ("mirrord_cache_entries", "Blobs in the cache")
_CACHE_LIMIT = ("mirrord_cache_limit_bytes", "The cache's size limit (max_size)")


class _CacheGauges:
    """The cache gauges of a worker's ``Metrics``, read from the store it
    watches at each collection (the store is the workers' shared cache)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        store = self._metrics._store
        if store is None:
            return
        size, entries = store.figures()
        for (name, text), value in (
            (_CACHE_SIZE, size),
            (_CACHE_ENTRIES, entries),
            (_CACHE_LIMIT, store.max_size),
        ):
            yield GaugeMetricFamily(name, text, value=value)


def _use_multiprocess(directory: Path) -> None:
    """Make sure this process writes its values to files in ``directory``.
    prometheus_client picks its value class when it is imported; a worker
    whose supervisor did not set ``PROMETHEUS_MULTIPROC_DIR`` before that
    gets it here, before its first metric is made."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") != str(directory):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
        values.ValueClass = values.MultiProcessValue()
    elif not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()


def multiprocess_dir(shared_dir: Path) -> Path:
    """Where a worker's metric files go: ``PROMETHEUS_MULTIPROC_DIR`` as the
    supervisor sets it, else ``metrics`` in the workers' shared directory."""
    return Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or shared_dir / "metrics")


def worker_died(pid: int, directory: Path) -> None:
    """For the supervisor, when the worker with ``pid`` died: its fills in
    progress stop counting; its counters stay in the totals, moved into
    the archive files so that dead workers' files do not pile up
    (``mirrord.metricsarchive``)."""
    archive_dead(pid, directory)


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
