"""The daemon's lifecycle: listen, tell systemd, reload on SIGHUP, and on
SIGTERM stop accepting, let transfers finish within a grace period, exit 0.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

from mirrord.daemon.systemd import notify
from mirrord.front.site import MirrordSite
from mirrord.store.worker import HashWorker

log = Logger()
# How often a stop looks whether the last connections have closed.
CLOSE_POLL = 0.05


class MirrordService(MultiService):
    """Owns the connection pool and the hash and login workers; the
    listeners are its child services."""

    def __init__(
        self,
        reactor: Any,
        pool: HTTPConnectionPool,
        site: MirrordSite,
        grace_period: float,
        reload: Callable[[], None] = lambda: None,
        hash_worker: HashWorker | None = None,
        login_worker: Service | None = None,
        notify: Callable[[str], object] = notify,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.pool = pool
        self.site = site
        self.grace_period = grace_period
        self.reload = reload
        self.hash_worker = hash_worker
        self.login_worker = login_worker
        # systemd, or the supervisor's pipe in a worker process.
        self.notify = notify

    def privilegedStartService(self) -> None:
        # Listeners bind here, before the reactor runs (and before privileges
        # are dropped): a port in use is the operator's problem, one line.
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise SystemExit(
                f"mirrord: cannot listen on {e.interface or '*'}:{e.port}: {e.socketError}"
            ) from None

    def startService(self) -> None:
        for worker in (self.hash_worker, self.login_worker):
            if worker is not None:
                worker.startService()
        super().startService()
        # twistd starts services before the reactor installs its own signal
        # handlers; ours must come after to replace them, and READY=1 after
        # ours: a SIGHUP sent on READY=1 must find the reload handler.
        if hasattr(self.reactor, "callFromThread"):
            self.reactor.callWhenRunning(self._running)
        else:
            self.notify("READY=1")

    def _running(self) -> None:
        install_signal_handlers(self.reactor, self._reload, self._reopen_logs)
        self.notify("READY=1")

    def _reopen_logs(self) -> None:
        if self.site.combined_log is not None:
            self.site.combined_log.reopen()
            log.info("reopened {path}", path=str(self.site.combined_log.path))

    def _reload(self) -> None:
        self.notify("RELOADING=1")
        try:
            self.reload()
        finally:
            self.notify("READY=1")

    def stopService(self) -> Deferred[None]:
        self.notify("STOPPING=1")
        listeners = super().stopService()  # stop accepting connections
        d = DeferredList([listeners, self._drained()], consumeErrors=True)
        d.addBoth(lambda _: self.pool.closeCachedConnections())
        # After the drain: the transfers still running needed them.
        for worker in (self.hash_worker, self.login_worker):
            if worker is not None:
                d.addBoth(lambda _, worker=worker: worker.stopService())
        return d

    def _drained(self) -> Deferred[None]:
        """Fires when no request is in flight, or when the grace period ends."""
        done: Deferred[None] = Deferred()
        active = len(self.site.active)
        if active:
            log.info(
                "waiting up to {grace}s for {active} requests in flight",
                grace=self.grace_period,
                active=active,
            )
        timer = self.reactor.callLater(self.grace_period, self._give_up, done)

        def finished(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        # A finished response may still sit in its transport's buffer (a
        # slow client's last megabyte): close every connection, which writes
        # what it holds first, and wait for them to be gone, or the process
        # would exit with those bytes unsent.
        self.site.when_idle().addCallback(lambda _: self._closed()).addCallback(finished)
        return done

    def _closed(self) -> Deferred[None]:
        """Fires when every connection has flushed and closed (the grace
        period's timer bounds the wait)."""
        for channel in list(self.site.channels):
            if channel.transport is not None:
                channel.transport.loseConnection()
        closed: Deferred[None] = Deferred()

        def check() -> None:
            if not self.site.channels:
                closed.callback(None)
            else:
                self.reactor.callLater(CLOSE_POLL, check)

        check()
        return closed

    def _give_up(self, done: Deferred[None]) -> None:
        log.warn("grace period over: cutting {active} transfers", active=len(self.site.active))
        channels = {request.channel for request in self.site.active} | self.site.channels
        for channel in channels:
            transport = channel.transport if channel else None
            if transport is not None:
                transport.abortConnection()
        if not done.called:
            done.callback(None)


def install_signal_handlers(
    reactor: Any, reload: Callable[[], None], reopen: Callable[[], None]
) -> None:
    """SIGTERM and SIGINT stop gracefully (twistd's own handler would make
    the process die by the signal, not exit 0); SIGHUP reloads; SIGUSR1
    reopens the logs. A second stop signal (a terminal's SIGINT reaches a
    worker and its supervisor, which passes SIGTERM on) changes nothing."""
    stopping = []

    def stop(signum: int, frame: object) -> None:
        if stopping:
            return
        stopping.append(signum)
        log.info("received signal {signal}: stopping gracefully", signal=signum)
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reload))
    signal.signal(signal.SIGUSR1, lambda signum, frame: reactor.callFromThread(reopen))
