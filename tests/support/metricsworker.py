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

from mirrord.front.status import totals
from mirrord.metrics import Metrics


@dataclass
class Store:
    """What the cache gauges read of the workers' shared store."""

    size: int = 0
    max_size: int = 0
    entries: dict[str, object] = field(default_factory=dict)


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
        metrics.watch(Store(size=1000, max_size=5000, entries={"a": 1, "b": 2}), ())
        print(
            json.dumps(
                {
                    "exposition": metrics.exposition().decode(),
                    "hits": totals(metrics).hits,
                    "cache_bytes": totals(metrics).cache_bytes,
                }
            )
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
