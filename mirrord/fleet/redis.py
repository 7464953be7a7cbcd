"""One bounded connection to the fleet's Redis: every call answers or fails
with ``FleetUnavailable`` within ``deadline`` seconds of the injected
reactor's clock, and a Redis that is down is noticed once, then skipped
for ``retry_after`` seconds, so callers never queue behind it.

Why not txredisapi's own connections: its factories use the global reactor
(reconnect delays, reply timeouts, name resolution) and its lazy connection
queues commands for as long as Redis is away. Only its wire protocol is
used here, over a connection this module makes with the injected reactor:
at most one connection attempt at a time (bounded by the deadline, shared
by every caller waiting for it), and a connection whose reply is late is
aborted rather than reused, so a frozen Redis costs each caller at most one
deadline and the next call after ``retry_after`` starts afresh.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from txredisapi import BaseRedisProtocol as _Protocol

log = Logger()

# Any reactor with IReactorTCP and IReactorTime: the daemon's, or a test's
# private one.
Reactor = Any


class FleetUnavailable(Exception):
    """Redis did not answer within the deadline, refused the connection, or
    answered with an error: the caller goes on without the fleet."""


@dataclass(frozen=True)
class Address:
    """Where Redis is and how to log in, from a ``redis://`` URL."""

    host: str
    port: int
    db: int
    username: str | None
    password: str | None


def parse_url(url: str) -> Address:
    """``redis://[[user]:password@]host[:port][/db]``; ValueError when it is not one."""
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ValueError(f"not a redis:// URL: {url!r}")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the database in {url!r} is not a number")
    return Address(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 6379,
        db=int(path or 0),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


class Script:
    """A Lua script, sent by its SHA-1 (EVALSHA) and in full only when the
    server has not seen it (after a restart or a SCRIPT FLUSH)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


@cache
def _redis() -> Any:
    """txredisapi, imported on first use: importing it installs the default
    global reactor (``from twisted.internet import reactor`` at its top), which
    must not happen before twistd installs the one it was asked for."""
    import txredisapi

    return txredisapi


@cache
def _protocol_class() -> type[_Protocol]:
    class Protocol(_redis().BaseRedisProtocol):  # type: ignore[misc]
        """txredisapi's RESP parser and command writer, on the injected
        reactor, ready as soon as TCP is (the client sends AUTH and SELECT)."""

        def __init__(self, reactor: Reactor, lost: Callable[[_Protocol], None]) -> None:
            # Text replies as str, numbers left as the strings Redis sent:
            # convertNumbers would turn an owner named "42" into an int.
            super().__init__(charset="utf-8", convertNumbers=False)
            # The class attribute is the global reactor's; re-entrant
            # parsing (setLineMode) must run on ours.
            self.callLater = reactor.callLater
            self._lost = lost

        def connectionMade(self) -> None:
            self._ready = True

        def connectionLost(self, why: Failure | None = None) -> None:
            super().connectionLost(why)
            self._lost(self)

    return Protocol


def _describe(failure: BaseException) -> str:
    return f"{type(failure).__name__}: {failure}".rstrip(": ")


class FleetRedis:
    """A lazily (re)connecting Redis client whose every call is bounded."""

    def __init__(
        self, reactor: Reactor, url: str, deadline: float = 2.0, retry_after: float = 1.0
    ) -> None:
        self._reactor = reactor
        self.address = parse_url(url)
        self.deadline = deadline
        self.retry_after = retry_after
        # Whether the last call got an answer, and why the last one did not.
        self.up = False
        self.last_error = "not started"
        # For the operations page and /metrics.
        self.calls = 0
        self.failures = 0
        self._running = False
        self._protocol: _Protocol | None = None
        self._connecting: Deferred[_Protocol] | None = None
        self._waiters: list[Deferred[_Protocol]] = []
        self._retry_at = 0.0

    def start(self) -> None:
        """Allow calls; the connection is made by the first one."""
        self._running = True
        self._retry_at = 0.0
        self.last_error = ""

    def stop(self) -> Deferred[None]:
        """Refuse further calls and close the connection; fires once it is closed."""
        self._running = False
        if self._connecting is not None:
            self._connecting.cancel()
        protocol, self._protocol = self._protocol, None
        if protocol is None or not protocol.connected:
            return succeed(None)
        closed: Deferred[None] = protocol.whenDisconnected().addCallback(lambda _: None)
        # abort, not loseConnection: a frozen Redis would never take the
        # FIN's turn in the write buffer.
        protocol.transport.abortConnection()
        return closed

    # -- calls --------------------------------------------------------------

    async def call(self, name: str, *args: Any) -> Any:
        """One command's reply (strings as str, integers as int)."""
        return await self._bounded(lambda protocol: protocol.execute_command(name, *args))

    async def eval(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run ``script`` atomically on the server: by its hash, else in full."""

        async def run(protocol: _Protocol) -> Any:
            try:
                return await protocol.execute_command(
                    "EVALSHA", script.sha, len(keys), *keys, *args
                )
            except _redis().ResponseError as e:
                if not str(e).startswith("NOSCRIPT"):
                    raise
            return await protocol.execute_command("EVAL", script.source, len(keys), *keys, *args)

        return await self._bounded(run)

    async def scan(self, match: str, count: int = 100, rounds: int = 100) -> list[str]:
        """Keys matching ``match``, by SCAN: at most ``rounds`` round trips
        (each one bounded), so a huge keyspace costs a partial answer, not a
        stall. SCAN may repeat a key; each is returned once."""
        seen: dict[str, None] = {}
        cursor = "0"
        for _ in range(rounds):
            cursor, keys = await self.call("SCAN", cursor, "MATCH", match, "COUNT", count)
            seen.update(dict.fromkeys(keys))
            if cursor == "0":
                break
        return list(seen)

    async def _bounded(self, operation: Callable[[_Protocol], Awaitable[Any]]) -> Any:
        if not self._running:
            raise FleetUnavailable("the fleet's Redis client is stopped")
        now = self._reactor.seconds()
        if now < self._retry_at:
            raise FleetUnavailable(
                f"Redis is down ({self.last_error}); next try in {self._retry_at - now:.2f} s"
            )

        async def attempt() -> Any:
            return await operation(await self._connection())

        self.calls += 1
        bounded = Deferred.fromCoroutine(attempt())
        bounded.addTimeout(self.deadline, self._reactor)
        try:
            result = await bounded
        except CancelledError:
            # The caller gave up (addTimeout turns our own deadline into
            # TimeoutError): no news about Redis, and a reply still due
            # is dropped by the protocol, so the connection stays usable.
            raise
        except FleetUnavailable:
            self.failures += 1
            raise
        except _redis().ResponseError as e:
            # It answered: the connection is fine, the command was not (a
            # script error, LOADING, OOM); callers treat it as no fleet.
            self._answered()
            self.failures += 1
            raise FleetUnavailable(f"Redis answered an error: {e}") from e
        except TimeoutError as e:
            reason = f"no answer within {self.deadline} s"
            self.failures += 1
            self._down(reason)
            raise FleetUnavailable(reason) from e
        except Exception as e:
            reason = _describe(e)
            self.failures += 1
            self._down(reason)
            raise FleetUnavailable(reason) from e
        self._answered()
        return result

    # -- the connection -----------------------------------------------------

    def _connection(self) -> Deferred[_Protocol]:
        """The live connection, or a place in line for the one attempt under way."""
        if self._protocol is not None and self._protocol.connected:
            return succeed(self._protocol)
        waiter: Deferred[_Protocol] = Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        if self._connecting is None:
            connecting = Deferred.fromCoroutine(self._connect())
            connecting.addTimeout(self.deadline, self._reactor)
            self._connecting = connecting
            connecting.addBoth(self._connected)
        return waiter

    async def _connect(self) -> _Protocol:
        protocol_class = _protocol_class()
        factory = Factory.forProtocol(lambda: protocol_class(self._reactor, self._lost))
        protocol: _Protocol = await self._endpoint().connect(factory)
        try:
            if self.address.password is not None:
                login = [self.address.username] if self.address.username else []
                await protocol.execute_command("AUTH", *login, self.address.password)
            if self.address.db:
                await protocol.execute_command("SELECT", self.address.db)
        except BaseException:
            protocol.transport.abortConnection()
            raise
        return protocol

    def _endpoint(self) -> Any:
        host, port = self.address.host, self.address.port
        if isIPAddress(host):
            return TCP4ClientEndpoint(self._reactor, host, port, timeout=self.deadline)
        if isIPv6Address(host):
            return TCP6ClientEndpoint(self._reactor, host, port, timeout=self.deadline)
        return HostnameEndpoint(self._reactor, host, port, timeout=self.deadline)

    def _connected(self, result: _Protocol | Failure) -> None:
        self._connecting = None
        waiters, self._waiters = self._waiters, []
        if isinstance(result, Failure) and not self._running:
            for waiter in waiters:
                waiter.errback(FleetUnavailable("the fleet's Redis client is stopped"))
            return
        if isinstance(result, Failure):
            if result.check(TimeoutError):
                reason = f"no connection within {self.deadline} s"
            else:
                reason = _describe(result.value)
            self._down(reason)
            for waiter in waiters:
                waiter.errback(FleetUnavailable(reason))
            return
        if not self._running:
            result.transport.abortConnection()
            for waiter in waiters:
                waiter.errback(FleetUnavailable("the fleet's Redis client is stopped"))
            return
        self._protocol = result
        for waiter in waiters:
            waiter.callback(result)

    def _lost(self, protocol: _Protocol) -> None:
        if self._protocol is protocol:
            self._protocol = None

    def _answered(self) -> None:
        if not self.up:
            log.info(
                "fleet Redis {host}:{port} answers", host=self.address.host, port=self.address.port
            )
        self.up = True
        self.last_error = ""

    def _down(self, reason: str) -> None:
        """Note the failure, drop the connection (a late reply would arrive
        out of turn), and skip Redis for ``retry_after`` seconds."""
        if self.up or reason != self.last_error:
            log.warn(
                "fleet Redis {host}:{port} unavailable: {reason}",
                host=self.address.host,
                port=self.address.port,
                reason=reason,
            )
        self.up = False
        self.last_error = reason
        self._retry_at = self._reactor.seconds() + self.retry_after
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.connected:
            protocol.transport.abortConnection()
