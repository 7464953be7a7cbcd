"""A stand-in worker for the metrics tests: a real process that counts
into the workers' metric files as a mirrord worker would, or reads them as
the worker answering ``/metrics`` would. Run as
``python -m tests.support.metricsworker DIR count KIND N FILLS QUOTA`` or
``... DIR read``; prints its pid, or what it read, as JSON."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet.task import Clock

from mirrord.front.history import History
from mirrord.front.status import StatusSource, totals
from mirrord.front.texts import TEXTS
from mirrord.metrics import Metrics


@dataclass
class Upstream:
    """An upstream as the status page reads it, as this worker saw it: no
    answer yet, so no quota of its own."""

    url: str = "hub"
    limited_until: float = 0.0
    quota: dict[str, int] = field(default_factory=dict)


@dataclass
class Chain:
    upstreams: list[Upstream] = field(default_factory=lambda: [Upstream()])


@dataclass
class Store:
    """What the cache gauges read of the workers' shared store."""

    size: int = 0
    max_size: int = 0
    entries: dict[str, object] = field(default_factory=dict)

    def figures(self) -> tuple[int, int]:
        return self.size, len(self.entries)


def main(directory: Path, command: str, *args: str) -> None:
    metrics = Metrics(directory)
    if command == "count":
        kind, n, fills, quota = args
        for _ in range(int(n)):
            metrics.requests.labels(kind).inc()
            metrics.cache.labels("HIT").inc()
            metrics.bytes_served.labels("cache").inc(100)
        metrics.watch(None, range(int(fills)))
        metrics.quota.labels("hub", "anonymous").set(int(quota))
        metrics.update_cache(None)
        print(json.dumps({"pid": os.getpid()}))
    else:
        store = Store(size=1000, max_size=5000, entries={"a": 1, "b": 2})
        metrics.watch(store, ())
        clock = Clock()
        status = StatusSource(
            metrics,
            History(lambda: totals(metrics), clock),
            clock,
            {"docker.io": Chain()},
            store,
            (),
        )
        page = status.render(TEXTS["en"])
        print(
            json.dumps(
                {
                    "exposition": metrics.exposition().decode(),
                    "hits": totals(metrics).hits,
                    "cache_bytes": totals(metrics).cache_bytes,
                    "upstreams": page[page.index('<ul class="upstreams">') :],
                    "fills": page[page.index("Fills in progress") :].split("</tr>")[0],
                }
            )
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
