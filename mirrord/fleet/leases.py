"""Per-digest leases: which host of the fleet fills a blob from upstream.

A lease is one key, ``{prefix}lease:{digest}``, whose value names its owner
(the owner's advertised address, so others can follow its spool) and which
expires unless renewed: a host that dies stops renewing and another can
take the digest over after ``ttl``. Renew and release are Lua scripts that
act only when the key still names the caller, so a host whose lease expired
while it was stalled can neither extend nor delete its successor's.

An ``acquire`` that raises ``FleetUnavailable`` after its deadline may
still have taken the lease on the server; nobody renews it, so it is gone
within ``ttl``, and a caller that fills on its own meanwhile can
``release`` it (only its own) once Redis answers again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mirrord.fleet.redis import FleetRedis, FleetUnavailable, Script

log = Logger()

_RENEW = Script(
    "if redis.call('GET', KEYS[1]) == ARGV[1] then"
    " return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end"
)
_RELEASE = Script(
    "if redis.call('GET', KEYS[1]) == ARGV[1] then"
    " return redis.call('DEL', KEYS[1]) else return 0 end"
)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class Leases:
    """Leases on digests, in one Redis shared by the fleet."""

    def __init__(self, redis: FleetRedis, prefix: str = "mirrord:") -> None:
        self.redis = redis
        self._prefix = prefix + "lease:"

    def _key(self, digest: str) -> str:
        return self._prefix + digest

    async def acquire(self, digest: str, owner: str, ttl: float) -> str | None:
        """Take the lease for ``ttl`` seconds: None when taken, else who holds
        it. Whoever holds it already (``owner`` included) keeps it as it is."""
        key = self._key(digest)
        taken = await self.redis.call("SET", key, owner, "NX", "PX", _ms(ttl))
        if taken == "OK":
            return None
        holder = await self.redis.call("GET", key)
        if holder is None:
            # It expired between the two calls: one more try, no loop.
            taken = await self.redis.call("SET", key, owner, "NX", "PX", _ms(ttl))
            if taken == "OK":
                return None
            holder = await self.redis.call("GET", key)
        # Still None only if it expired twice in two round trips; the caller
        # then sees an owner it cannot reach and fills on its own.
        return holder if holder is not None else ""

    async def renew(self, digest: str, owner: str, ttl: float) -> bool:
        """Extend the lease to ``ttl`` from now, if ``owner`` still holds it."""
        return bool(await self.redis.eval(_RENEW, [self._key(digest)], [owner, _ms(ttl)]))

    async def release(self, digest: str, owner: str) -> None:
        """Give the lease up, if ``owner`` still holds it."""
        await self.redis.eval(_RELEASE, [self._key(digest)], [owner])

    async def owner(self, digest: str) -> str | None:
        """Who holds the lease on ``digest``, if anyone."""
        holder: str | None = await self.redis.call("GET", self._key(digest))
        return holder

    async def held(self, limit: int = 1000) -> dict[str, str]:
        """Leases held now, digest to owner, for the operations page: at most
        ``limit`` of them, found by a bounded SCAN."""
        keys = (await self.redis.scan(self._prefix + "*", count=100, rounds=10))[:limit]
        if not keys:
            return {}
        owners = await self.redis.call("MGET", *keys)
        start = len(self._prefix)
        return {
            key[start:]: owner for key, owner in zip(keys, owners, strict=True) if owner is not None
        }


class LeaseKeeper:
    """Renews one held lease every ``ttl``/3 on ``clock`` until stopped.

    It starts when made (the lease was just acquired, so the first renewal
    is ``ttl``/3 later); ``start()`` is there for symmetry and does nothing
    more. A renewal Redis refuses because the key names someone else (or
    nobody: it expired while Redis or this host stalled) stops the keeper
    and calls ``on_lost``; a renewal that fails because Redis is unavailable
    is retried at the next tick, since the lease may well still be ours.
    """

    def __init__(
        self,
        clock: IReactorTime,
        leases: Leases,
        digest: str,
        owner: str,
        ttl: float,
        on_lost: Callable[[], Any] | None = None,
    ) -> None:
        self.leases = leases
        self.digest = digest
        self.owner = owner
        self.ttl = ttl
        self.on_lost = on_lost
        self.renewals = 0
        self.lost = False
        self._loop = LoopingCall(self._renew)
        self._loop.clock = clock
        self._running: Deferred[LoopingCall] = self._loop.start(ttl / 3, now=False)
        self._running.addErrback(self._crashed)

    @property
    def active(self) -> bool:
        return self._loop.running

    def start(self) -> LeaseKeeper:
        return self

    def stop(self) -> None:
        """Stop renewing (the caller releases the lease if it wants to)."""
        if self._loop.running:
            self._loop.stop()

    def _renew(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._renew_once())

    async def _renew_once(self) -> None:
        try:
            still = await self.leases.renew(self.digest, self.owner, self.ttl)
        except FleetUnavailable as e:
            log.warn("lease on {digest} not renewed: {reason}", digest=self.digest, reason=str(e))
            return
        if not self._loop.running:
            return
        if still:
            self.renewals += 1
            return
        log.warn("lease on {digest} lost by {owner}", digest=self.digest, owner=self.owner)
        self.lost = True
        self._loop.stop()
        if self.on_lost is not None:
            self.on_lost()

    def _crashed(self, failure: Failure) -> None:
        log.failure("lease keeper for {digest} crashed", failure, digest=self.digest)
