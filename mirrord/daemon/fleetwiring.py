"""The shared store and the fleet, built from ``[store]`` and ``[fleet]``:
the S3 bucket behind the disk cache, the Redis leases and member list,
the client of the other members' fills and the endpoint that serves ours,
and the loops that keep them (status, stale uploads, the index)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.web.resource import Resource

from mirrord.config import Config, ConfigError
from mirrord.fleet.status import FleetStatus
from mirrord.store.bucket import Bucket

log = Logger()

STATUS_EVERY = 5.0
CLEANUP_EVERY = 3600.0
PINS_EVERY = 60.0
# Multipart uploads older than this were left by a host that died.
STALE_UPLOAD = 24 * 3600.0


@dataclass
class FleetParts:
    bucket: Bucket | None
    fleet: Any  # mirrord.fleet.coordinator.Fleet | None
    status: FleetStatus
    resource: Resource | None
    service: Service


def _read_secret(path: str, what: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read: {e.strerror}") from None


def check_fleet_files(config: Config) -> None:
    """The secret files a start reads, readable and well formed (for
    ``--check-config`` as for a start)."""
    if config.store.backend == "s3" and not _read_secret(
        config.store.secret_key_file, "[store] secret_key_file"
    ):
        raise ConfigError(f"[store] secret_key_file {config.store.secret_key_file} is empty")
    if config.store.backend == "s3" and config.store.tls_ca:
        from mirrord.store.s3.client import TrustCA

        _check_ca(TrustCA, config.store.tls_ca, "[store] tls_ca")
    if config.fleet.redis:
        from mirrord.fleet.peer import trust
        from mirrord.fleet.secret import FleetSecret

        try:
            FleetSecret.load(config.fleet.secret_file)
        except (OSError, ValueError) as e:
            raise ConfigError(f"[fleet] secret_file {config.fleet.secret_file}: {e}") from None
        if config.fleet.tls_ca:
            _check_ca(trust, config.fleet.tls_ca, "[fleet] tls_ca")


def _check_ca(load: Callable[[str], object], path: str, what: str) -> None:
    try:
        load(path)
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read: {e.strerror}") from None
    except Exception as e:  # not PEM, no certificate
        raise ConfigError(f"{what} {path}: no usable CA certificate ({e})") from None


def build_fleet(
    config: Config,
    reactor: Any,
    store: Any,
    in_flight: Any,
    run: Callable[..., Any],
    singleton: bool,
) -> FleetParts | None:
    """None when the host stands alone (disk store, no Redis)."""
    if config.store.backend != "s3" and not config.fleet.redis:
        return None
    bucket = None
    if config.store.backend == "s3":
        from mirrord.store.s3.breaker import Breaker
        from mirrord.store.s3.client import S3Client

        s3 = config.store
        client = S3Client(
            reactor,
            s3.endpoint,
            s3.bucket,
            s3.region,
            s3.access_key,
            _read_secret(s3.secret_key_file, "[store] secret_key_file"),
            prefix=s3.prefix,
            tls_ca=s3.tls_ca or None,
            deadline=s3.deadline,
            breaker=Breaker(reactor, s3.breaker_failures, s3.breaker_reset),
            run=run,
        )
        bucket = Bucket(
            client,
            reactor,
            None,
            s3.max_size,
            s3.redirect_ttl,
            s3.part_size,
            config.cache.pinned,
            host=config.fleet.member or socket.gethostname(),
        )
    status = FleetStatus(reactor, bucket=bucket, max_size=config.store.max_size)
    fleet = resource = redis = members = None
    if config.fleet.redis:
        from mirrord.fleet.coordinator import Fleet
        from mirrord.fleet.endpoint import FleetResource
        from mirrord.fleet.index import FleetIndex
        from mirrord.fleet.leases import Leases
        from mirrord.fleet.members import Members
        from mirrord.fleet.peer import PeerClient
        from mirrord.fleet.redis import FleetRedis
        from mirrord.fleet.secret import FleetSecret

        f = config.fleet
        try:
            secret = FleetSecret.load(f.secret_file)
        except (OSError, ValueError) as e:
            raise ConfigError(f"[fleet] secret_file {f.secret_file}: {e}") from None
        redis = FleetRedis(reactor, f.redis, f.deadline)
        leases = Leases(redis)
        peers = PeerClient(reactor, secret, f.tls_ca or None, config.timeouts.response)
        fleet = Fleet(reactor, leases, peers, f.advertise, f.lease_ttl)
        members = Members(redis, reactor, f.member or socket.gethostname(), f.advertise)
        if bucket is not None:
            bucket.index = FleetIndex(redis)
        status.fleet, status.redis, status.members_of = fleet, redis, members
        status.index = bucket.index if bucket is not None else None
        resource = FleetResource(
            secret,
            store,
            in_flight,
            reactor,
            config.timeouts.client_idle,
            run,
            follow_idle=max(config.timeouts.response, config.timeouts.body_idle)
            * (config.cache.resume_attempts + 2),
            fill_timeout=config.cache.fill_timeout,
        )
    tag_pins = [p for p in config.cache.pinned if ":" in p]

    async def pins() -> set[str]:
        return await run(store.tag_pins_on_disk, tag_pins) if tag_pins else set()

    service = _FleetService(status, bucket, redis, members, singleton, pins, config.grace_period)
    return FleetParts(bucket, fleet, status, resource, service)


class _FleetService(Service):
    """Starts and stops the fleet's connections and loops with the daemon."""

    name = "fleet"

    def __init__(
        self,
        status: FleetStatus,
        bucket: Bucket | None,
        redis: Any,
        members: Any,
        singleton: bool,
        pins: Callable[[], Any],
        grace_period: float = 30.0,
    ) -> None:
        self._pins = pins
        self._grace = grace_period
        self._status = status
        self._bucket = bucket
        self._redis = redis
        self._members = members
        self._singleton = singleton
        self._loops: list[LoopingCall] = []

    def startService(self) -> None:
        super().startService()
        if self._redis is not None:
            self._redis.start()
        if self._members is not None:
            self._members.start()
        self._every(STATUS_EVERY, self._status.poll)
        if self._bucket is not None and self._singleton:
            self._every(CLEANUP_EVERY, self._tidy)
            if self._bucket.index is not None:
                self._every(PINS_EVERY, self._pin_tags)

    def _every(self, seconds: float, job: Callable[[], Any]) -> None:
        loop = LoopingCall(lambda: ensureDeferred(job()).addErrback(_logged))
        loop.clock = self._status.clock
        loop.start(seconds, now=True)
        self._loops.append(loop)

    async def _tidy(self) -> None:
        """Once a host (worker 1): the bucket exists, uploads a dead host
        left are aborted, and the fleet's index agrees with the bucket."""
        assert self._bucket is not None
        client = self._bucket.client
        await client.ensure_bucket()
        aborted = await self._bucket.abort_stale_uploads(STALE_UPLOAD)
        if aborted:
            log.info("aborted {count} stale multipart uploads", count=aborted)
        if self._bucket.index is not None:
            await self._bucket.reconcile()

    async def _pin_tags(self) -> None:
        assert self._bucket is not None
        await self._bucket.pin_tags(await self._pins())

    def stopService(self) -> Any:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        super().stopService()
        return ensureDeferred(self._leave())

    async def _leave(self) -> None:
        """Fills draining during the grace period still hold and renew
        their leases and upload when done: Redis and S3 stay until they
        finished (within ``grace_period``); then the member's key goes,
        then the connections."""
        fleet = self._status.fleet
        clock = self._status.clock
        deadline = clock.seconds() + self._grace
        while fleet is not None and fleet.owned and clock.seconds() < deadline:
            await deferLater(clock, 0.2)
        if self._members is not None:
            await self._members.stop()
        if fleet is not None:
            await fleet.peers.close()
        if self._bucket is not None:
            await self._bucket.client.close()
        if self._redis is not None:
            await self._redis.stop()


def _logged(failure: Any) -> None:
    log.warn("fleet upkeep failed: {error}", error=failure.value)
