"""This host's part in fetching each blob once per fleet.

Before a host fills a blob from upstream it takes the digest's lease in
Redis, naming its own internal address. A host that finds the lease held
streams the blob from the owner's fill (``mirrord.fleet.endpoint``) into a
fill of its own, which verifies the digest again. The owner renews the
lease while its fill runs and lets it go once the blob is in the shared
store (or the fill failed); if it dies, the lease expires and the next
host to ask takes over. Without Redis, or when it does not answer within
its deadline, every host fills on its own: slower for the upstream, never
broken.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from mirrord.fleet.leases import LeaseKeeper, Leases
from mirrord.fleet.peer import PeerClient
from mirrord.fleet.redis import FleetUnavailable
from mirrord.store.disk import Meta

log = Logger()


@dataclass
class Owned:
    """This host holds the digest's lease; ``release`` once the blob is
    in the shared store or the fill failed."""

    fleet: Fleet
    digest: str
    keeper: LeaseKeeper

    def release(self) -> None:
        self.fleet.release(self)


@dataclass(frozen=True)
class Elsewhere:
    """Another host is filling the digest: follow it at ``owner``."""

    owner: str


@dataclass
class Fleet:
    """Leases per digest and the client of the other members' fills."""

    clock: IReactorTime
    leases: Leases
    peers: PeerClient
    advertise: str
    lease_ttl: float
    owned: dict[str, Owned] = field(default_factory=dict)
    # This process's name in leases: its host's address and a nonce, so
    # that a sibling worker's lease is never taken for this one's.
    owner_id: str = ""
    takeovers: int = 0
    follows: int = 0
    coordination_failures: int = 0

    def __post_init__(self) -> None:
        if not self.owner_id:
            self.owner_id = f"{self.advertise}#{uuid.uuid4().hex[:12]}"

    async def claim(self, digest: str) -> Owned | Elsewhere | None:
        """This host's lease on ``digest``, the owner to follow, or None
        when Redis cannot say (then fill alone)."""
        mine = self.owned.get(digest)
        if mine is not None:
            return mine
        try:
            other = await self.leases.acquire(digest, self.owner_id, self.lease_ttl)
        except FleetUnavailable as e:
            self.coordination_failures += 1
            log.warn("no fleet lease for {digest} ({error}): filling alone", digest=digest, error=e)
            return None
        if other is not None and other != self.owner_id:
            # Another host, or another process of this one: its endpoint
            # finds that process's fill by its lock (or says 404, and the
            # caller fills alone).
            return Elsewhere(other.partition("#")[0])
        keeper = LeaseKeeper(self.clock, self.leases, digest, self.owner_id, self.lease_ttl)
        owned = Owned(self, digest, keeper)
        keeper.on_lost = lambda: self._lost(owned)
        self.owned[digest] = owned
        return owned

    async def follow(self, owner: str, digest: str, offset: int = 0) -> tuple[IResponse, Meta]:
        """The owner's fill from ``offset`` (raises ``PeerUnavailable``)."""
        got = await self.peers.get_blob(owner, digest, offset)
        self.follows += 1
        return got

    def release(self, owned: Owned) -> None:
        if self.owned.get(owned.digest) is not owned:
            return
        del self.owned[owned.digest]
        owned.keeper.stop()
        # Not released (Redis away): it expires within lease_ttl.
        ensureDeferred(self.leases.release(owned.digest, self.owner_id)).addErrback(
            lambda f: log.warn("cannot release {d}: {e}", d=owned.digest, e=f.value)
        )

    def _lost(self, owned: Owned) -> None:
        """Another host took the lease (ours expired while Redis was away):
        our fill goes on; the blob may be fetched twice, never corrupted."""
        log.warn("fleet lease on {digest} lost to another host", digest=owned.digest)
        if self.owned.get(owned.digest) is owned:
            del self.owned[owned.digest]
