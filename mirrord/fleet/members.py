"""The fleet's live members: each host keeps one key,
``{prefix}member:{member_id}``, holding its advertised address and expiring
``ttl`` seconds after its last heartbeat, so a host that dies or loses Redis
drops out of the list within ``ttl`` without anyone having to notice."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mirrord.fleet.redis import FleetRedis, FleetUnavailable, Script

log = Logger()

# Only the member's own key, and only while it still says this member's
# address: a restarted host with the same id and a new address is not
# removed by the old one's late stop.
_LEAVE = Script(
    "if redis.call('GET', KEYS[1]) == ARGV[1] then"
    " return redis.call('DEL', KEYS[1]) else return 0 end"
)


class Members:
    """This host's heartbeat, and the list of every member's."""

    def __init__(
        self,
        redis: FleetRedis,
        clock: IReactorTime,
        member_id: str,
        advertise: str,
        ttl: float = 15.0,
        prefix: str = "mirrord:",
    ) -> None:
        self.redis = redis
        self.member_id = member_id
        self.advertise = advertise
        self.ttl = ttl
        self._prefix = prefix + "member:"
        self._loop = LoopingCall(self._beat)
        self._loop.clock = clock
        self.beats = 0

    @property
    def key(self) -> str:
        return self._prefix + self.member_id

    def start(self) -> None:
        """Heartbeat now and every ``ttl``/3."""
        if not self._loop.running:
            self._loop.start(self.ttl / 3, now=True).addErrback(self._crashed)

    def stop(self) -> Deferred[None]:
        """Stop the heartbeat and leave the list now (or, when Redis is
        unavailable, within ``ttl``). A Deferred, not a coroutine, so the
        heartbeat stops even if nobody waits for the rest."""
        if self._loop.running:
            self._loop.stop()
        return Deferred.fromCoroutine(self._leave())

    async def _leave(self) -> None:
        try:
            await self.redis.eval(_LEAVE, [self.key], [self.advertise])
        except FleetUnavailable as e:
            log.warn("fleet member {member} not removed: {reason}", member=self.member_id, reason=e)

    async def list(self, limit: int = 1000) -> dict[str, str]:
        """Live members, id to advertised address (at most ``limit``, by a
        bounded SCAN)."""
        keys = (await self.redis.scan(self._prefix + "*", count=100, rounds=10))[:limit]
        if not keys:
            return {}
        addresses = await self.redis.call("MGET", *keys)
        start = len(self._prefix)
        return {
            key[start:]: address
            for key, address in zip(keys, addresses, strict=True)
            if address is not None
        }

    def _beat(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._beat_once())

    async def _beat_once(self) -> None:
        try:
            await self.redis.call(
                "SET", self.key, self.advertise, "PX", max(1, round(self.ttl * 1000))
            )
        except FleetUnavailable as e:
            # Logged by the client when Redis goes down; the next beat retries.
            log.debug("heartbeat of {member} failed: {reason}", member=self.member_id, reason=e)
            return
        self.beats += 1

    def _crashed(self, failure: Failure) -> None:
        log.failure("heartbeat of {member} crashed", failure, member=self.member_id)
