"""The daemon's lifecycle: listeners up on start; on stop, listeners down
and the upstream connection pool closed."""

from __future__ import annotations

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

log = Logger()


class MirrordService(MultiService):
    """Owns the connection pool; the listeners are its child services."""

    def __init__(self, pool: HTTPConnectionPool) -> None:
        super().__init__()
        self.pool = pool

    def privilegedStartService(self) -> None:
        # Listeners bind here, before the reactor runs (and before privileges
        # are dropped): a port in use is the operator's problem, one line.
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise SystemExit(
                f"mirrord: cannot listen on {e.interface or '*'}:{e.port}: {e.socketError}"
            ) from None

    def stopService(self) -> Deferred[None]:
        d = super().stopService()
        d.addBoth(lambda _: self.pool.closeCachedConnections())
        return d
