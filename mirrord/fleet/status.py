"""What the usage page and ``/metrics`` say about the shared store and
the fleet: read from S3 and Redis every few seconds by a loop (a scrape
never waits on them), and reported as gauges at each collection."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()


@dataclass(eq=False)  # a collector: registered by identity
class FleetStatus:
    """The last figures seen; ``poll`` refreshes them."""

    clock: IReactorTime
    bucket: Any = None  # mirrord.store.bucket.Bucket
    fleet: Any = None  # mirrord.fleet.coordinator.Fleet
    redis: Any = None  # mirrord.fleet.redis.FleetRedis
    members_of: Any = None  # mirrord.fleet.members.Members
    index: Any = None  # mirrord.fleet.index.FleetIndex
    max_size: int = 0
    members: dict[str, str] = field(default_factory=dict)
    leases: dict[str, str] = field(default_factory=dict)
    shared_bytes: int = -1
    shared_blobs: int = -1
    polled: float = 0.0

    @property
    def store_up(self) -> bool:
        return self.bucket is not None and self.bucket.healthy

    @property
    def redis_up(self) -> bool:
        return self.redis is not None and self.redis.up

    async def poll(self) -> None:
        """Refresh from Redis; each part on its own (one down, the others still seen)."""
        self.polled = self.clock.seconds()
        if self.redis is None:
            return
        try:
            if self.members_of is not None:
                self.members = await self.members_of.list()
            if self.fleet is not None:
                self.leases = await self.fleet.leases.held()
            if self.index is not None:
                self.shared_bytes = await self.index.total()
                self.shared_blobs = await self.index.count()
        except Exception as e:
            log.debug("fleet status not refreshed: {e}", e=e)

    def as_dict(self) -> dict[str, Any]:
        """For the usage page."""
        return {
            "store": {
                "backend": "s3" if self.bucket is not None else "disk",
                "up": self.store_up if self.bucket is not None else None,
                "bytes": self.shared_bytes,
                "blobs": self.shared_blobs,
                "max_size": self.max_size,
                "uploads": getattr(self.bucket, "uploads", 0),
                "upload_failures": getattr(self.bucket, "upload_failures", 0),
            },
            "fleet": {
                "redis_up": self.redis_up if self.redis is not None else None,
                "members": dict(self.members),
                "leases": dict(self.leases),
                "follows": getattr(self.fleet, "follows", 0),
                "takeovers": getattr(self.fleet, "takeovers", 0),
            },
        }

    def collect(self) -> Iterator[Metric]:
        if self.bucket is not None:
            yield _gauge(
                "mirrord_shared_store_up",
                "1 when S3 answers (its breaker closed)",
                int(self.store_up),
            )
            yield _gauge(
                "mirrord_shared_store_uploads", "Blobs this process uploaded", self.bucket.uploads
            )
            if self.shared_bytes >= 0:
                yield _gauge(
                    "mirrord_shared_store_size_bytes",
                    "Bytes in the shared store",
                    self.shared_bytes,
                )
                yield _gauge(
                    "mirrord_shared_store_blobs", "Blobs in the shared store", self.shared_blobs
                )
            if self.max_size:
                yield _gauge(
                    "mirrord_shared_store_limit_bytes", "The shared store's cap", self.max_size
                )
        if self.redis is not None:
            yield _gauge("mirrord_fleet_redis_up", "1 when Redis answered last", int(self.redis_up))
            yield _gauge("mirrord_fleet_members", "Members heard from", len(self.members))
            yield _gauge(
                "mirrord_fleet_leases",
                "Digests being filled somewhere in the fleet",
                len(self.leases),
            )
            if self.fleet is not None:
                yield _gauge(
                    "mirrord_fleet_follows",
                    "Fills this process fed from another member",
                    self.fleet.follows,
                )
                yield _gauge(
                    "mirrord_fleet_takeovers",
                    "Fills this process took over from a member that went",
                    self.fleet.takeovers,
                )


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)
