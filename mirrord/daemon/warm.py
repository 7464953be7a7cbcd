"""Warming the cache ahead of need: ``[cache] warm`` images pulled at start
and every ``warm_interval``, through the daemon's own front door.

Through the front door means an HTTPS request to the daemon's first
listener on loopback, made by ``mirrord.warm.Puller`` exactly as a client
makes it. The other way, calling into the resource tree in-process, would
need a fake transport pumped by hand (treq's testing agent does that for
tests) and would skip the TLS layer, the channel and its timeouts; it could
also drift from the client path as the site grows. Over loopback a warm
pull is a client pull: the guard admits it (it comes from the loopback
address: an ``allow_clients`` list must include it, and with mirror login
on, warming needs a user, so it is refused and logged), the access log and
``/metrics`` count it, the cache verifies every blob before keeping it, the
tag goes through ``tag_ttl`` and shared HEADs, the upstream chain's rests
and quota reserve apply. The cost is a TLS handshake per pooled connection.

The connection trusts exactly one certificate: the one the listener serves
now (read from the live server context, so a reload's new certificate is
trusted at the next run). Its name is not checked: the address is our own
listening socket, and a name would have to match whatever the operator's
certificate says.

Runs never overlap: the next one is due ``warm_interval`` after the last
one started, or at once when it ran longer than that. A failing image is
logged with the reason and tried again at the next run; the others go on.
Stopping cancels the run in flight, its requests included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from mirrord.warm import Image, Pulled, Puller, pull_all, reason

log = Logger()


class WarmService(Service):
    """Pulls ``images`` with a fresh ``Puller`` from ``make_puller`` at start
    and every ``interval`` seconds."""

    name = "warm"

    def __init__(
        self,
        images: Sequence[Image],
        interval: float,
        clock: IReactorTime,
        make_puller: Callable[[], Puller],
        close: Callable[[], object] = lambda: None,
    ) -> None:
        self.images = tuple(images)
        self.interval = interval
        self.clock = clock
        self.make_puller = make_puller
        self.close = close
        self.runs = 0
        self._next: IDelayedCall | None = None
        self._run: Deferred[Any] | None = None
        self._puller: Puller | None = None

    def startService(self) -> None:
        super().startService()
        if self.images:
            # After the reactor has started the listeners, not during startup.
            self._next = self.clock.callLater(0, self.run_now)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        if self._puller is not None:
            self._puller.stop()
        if self._run is not None:
            self._run.cancel()
        self.close()
        return None

    def run_now(self) -> Deferred[Any] | None:
        """Start a run unless one is under way (then ``None``)."""
        self._next = None
        if self._run is not None or not self.running:
            return None
        started = self.clock.seconds()
        self.runs += 1
        log.info("warm run {run}: {count} images", run=self.runs, count=len(self.images))
        self._puller = puller = self.make_puller()
        run = self._run = pull_all(puller, self.images)
        run.addCallback(self._report)
        run.addErrback(lambda f: f.trap(CancelledError))
        run.addErrback(lambda f: log.failure("warm run failed", f))
        run.addBoth(self._finished, started)
        return run

    def _report(self, results: dict[Image, Pulled | Failure]) -> None:
        for image, result in results.items():
            if isinstance(result, Pulled):
                log.info(
                    "warmed {image}: {manifests} manifests, {blobs} blobs, {bytes} bytes",
                    image=str(image),
                    manifests=result.manifests,
                    blobs=result.blobs,
                    bytes=result.bytes,
                )
            else:
                log.warn(
                    "warming {image} failed: {reason}; next try in {interval}s",
                    image=str(image),
                    reason=reason(result),
                    interval=self.interval,
                )

    def _finished(self, result: object, started: float) -> None:
        self._run = None
        self._puller = None
        if self.running:
            due = max(0.0, started + self.interval - self.clock.seconds())
            self._next = self.clock.callLater(due, self.run_now)


@implementer(IStreamServerEndpoint)
class RecordingEndpoint:
    """A server endpoint that remembers the port it listened on, so the
    warm puller knows where its own front door is (a port 0 included)."""

    def __init__(self, endpoint: IStreamServerEndpoint) -> None:
        self.endpoint = endpoint
        self.port: IListeningPort | None = None

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        def record(port: IListeningPort) -> IListeningPort:
            self.port = port
            return port

        return self.endpoint.listen(factory).addCallback(record)


@implementer(IOpenSSLClientConnectionCreator)
class PinnedCertificate:
    """TLS to ourselves: the server's certificate must be exactly the one
    ``expected()`` names (its SHA-256 as pyOpenSSL writes it)."""

    def __init__(self, expected: Callable[[], bytes]) -> None:
        self.expected = expected

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        pin = self.expected()

        def check(conn: SSL.Connection, cert: Any, err: int, depth: int, ok: int) -> bool:
            # The chain above the leaf is not ours to judge: the leaf is pinned.
            return depth > 0 or cert.digest("sha256") == pin

        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, check)
        connection = SSL.Connection(context, None)
        connection.set_connect_state()
        return connection


def served_certificate(context: Callable[[], SSL.Context]) -> Callable[[], bytes]:
    """The SHA-256 of the certificate the server context serves now."""

    def pin() -> bytes:
        certificate = SSL.Connection(context(), None).get_certificate()
        return certificate.digest("sha256") if certificate is not None else b""

    return pin


@implementer(IAgentEndpointFactory)
class OwnListener:
    """Every URL the warm puller asks for (the mirror's ``/token`` realm
    included) goes to the recorded listener, over loopback, pinned TLS."""

    def __init__(
        self,
        reactor: Any,
        listener: RecordingEndpoint,
        creator: IOpenSSLClientConnectionCreator,
        timeout: float,
    ) -> None:
        self.reactor = reactor
        self.listener = listener
        self.creator = creator
        self.timeout = timeout

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        host, port = loopback_address(self.listener)
        if ":" in host:
            inner: IStreamClientEndpoint = TCP6ClientEndpoint(
                self.reactor, host, port, timeout=self.timeout
            )
        else:
            inner = TCP4ClientEndpoint(self.reactor, host, port, timeout=self.timeout)
        return wrapClientTLS(self.creator, inner)


def loopback_address(listener: RecordingEndpoint) -> tuple[str, int]:
    """Where to reach the listener from this host: its own address, or the
    loopback one when it listens on every address."""
    if listener.port is None:
        raise ConnectionError("the first listener is not listening")
    address = listener.port.getHost()
    if not isinstance(address, (IPv4Address, IPv6Address)):
        raise ConnectionError(f"cannot warm through a {type(address).__name__} listener")
    host = address.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, address.port


def build_warm_service(
    reactor: Any,
    images: Sequence[Image],
    interval: float,
    listener: RecordingEndpoint,
    server_context: Callable[[], SSL.Context],
    timeout: float,
    idle: float,
) -> WarmService:
    """The daemon's warm service: pulls through ``listener`` with their own
    connection pool (closed on stop)."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 4
    endpoints = OwnListener(
        reactor, listener, PinnedCertificate(served_certificate(server_context)), timeout
    )
    agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)

    def make_puller() -> Puller:
        # The host name only fills the Host header (and so the realm of the
        # mirror's challenge): OwnListener sends every request to the listener.
        return Puller(agent, reactor, "https://localhost", timeout=timeout, idle=idle, verify=False)

    return WarmService(images, interval, reactor, make_puller, pool.closeCachedConnections)
