"""The daemon's lifecycle: listeners up on start; on stop, listeners down
and the upstream connection pool closed."""

from __future__ import annotations

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

log = Logger()


class MirrordService(MultiService):
    """Owns the connection pool; the listeners are its child services."""

    def __init__(self, pool: HTTPConnectionPool) -> None:
        super().__init__()
        self.pool = pool

    def stopService(self) -> Deferred[None]:
        d = super().stopService()
        d.addBoth(lambda _: self.pool.closeCachedConnections())
        return d
