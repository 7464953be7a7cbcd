"""The resource tree, the HTTP channel and the access log.

``/v2/`` is the registry proxy, ``/token`` the auth proxy, ``/healthz`` a
liveness probe, ``/metrics`` Prometheus metrics, ``/`` the usage page.
Everything else is a registry-style 404 so clients always get JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mirrord.front import accesslog
from mirrord.front.guard import Guard, GuardedRoot
from mirrord.front.usage import CONTENT_SECURITY_POLICY
from mirrord.registry import errors
from mirrord.registry.errors import error_body
from mirrord.registry.respond import (
    ReadOnlyResource,
    client_address,
    plain_address,
    write_error,
)

# The mirror takes no uploads; the largest body it reads is a /token form.
MAX_REQUEST_BODY = 64 * 1024


class _Discard:
    """Absorbs the body of a refused request until its connection closes."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args: object) -> None:
        pass

    def read(self, *args: object) -> bytes:
        return b""

    def close(self) -> None:
        pass


class MirrordRequest(Request):
    """A request that carries what the access event needs."""

    refused = False
    # HTTP/1.0 with ``Connection: keep-alive`` (see ``MirrordChannel``).
    keep_alive_1_0 = False

    def gotLength(self, length: int | None) -> None:
        # Twisted would spool any body, however large, to a temporary file
        # before we see the request: refuse big or unbounded (chunked) ones.
        if length is None or length > MAX_REQUEST_BODY:
            self.refused = True
            self.content = _Discard()
            self.channel.refuse(413, "SIZE_INVALID", "request body too large for a mirror")
            return
        super().gotLength(length)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        try:
            super().requestReceived(command, path, version)
        except ValueError:
            # Twisted parses a POST form's Content-Type with the email
            # package, which raises on a value holding a line separator
            # (0x1c-0x1e, 0x85): that would escape dataReceived with no
            # answer. (process() catches its own errors; this is parsing.)
            self.channel._respondToBadRequestAndDisconnect()

    def process(self) -> None:
        if self.refused:
            return
        site = self.channel.site
        clock: IReactorTime = site.reactor
        self.access = accesslog.AccessRecord(started=clock.seconds())
        self._site = site
        self._clock = clock
        self._logged = False
        site.began(self)
        super().process()

    # The access event once the request has ended, either way: called here
    # rather than from ``notifyFinish`` (a Deferred per request), after
    # Twisted's own cleanup and the callbacks of those who asked.
    _logged = True  # until ``process`` has begun the request

    def finish(self) -> None:
        super().finish()
        if not self._logged:
            self._log_access(None)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        if not self._logged:
            self._log_access(reason)

    def write(self, data: bytes) -> None:
        if not self.startedWriting and self.clientproto == b"HTTP/1.0":
            self._keep_alive_1_0()
        record = getattr(self, "access", None)
        if record is not None and record.source and data and self.method != b"HEAD":
            self._site.count_body(record.source, len(data))
        super().write(data)

    def _keep_alive_1_0(self) -> None:
        """An HTTP/1.0 client that asked to keep the connection (``ab -k``)
        keeps it when the answer's end is known without a close: a
        Content-Length, or no body at all. Twisted closes every HTTP/1.0
        connection; its channel asked ``checkPersistence`` before the
        answer existed, so the decision is made here, with the headers."""
        if not self.keep_alive_1_0:
            return
        if (
            self.responseHeaders.hasHeader(b"content-length")
            or self.method == b"HEAD"
            or self.code in http.NO_BODY_CODES
        ):
            self.responseHeaders.setRawHeaders(b"connection", [b"keep-alive"])
        else:
            self.channel.persistent = False

    def _log_access(self, result: object) -> None:
        self._logged = True
        clock = self._clock
        self._site.ended(self)
        if result is not None:
            self.access.outcome = "client disconnected"
        combined = self._site.combined_log
        if combined is not None:
            combined.write(
                client=client_address(self),
                request_line=" ".join(
                    part.decode("latin-1") for part in (self.method, self.uri, self.clientproto)
                ),
                status=self.code,
                sent=self.sentLength,
                referer=(self.getHeader(b"referer") or b"").decode("latin-1"),
                agent=(self.getHeader(b"user-agent") or b"").decode("latin-1"),
                when=self.access.started,
            )
        accesslog.emit(
            client=client_address(self),
            method=self.method.decode("latin-1"),
            path=self.uri.decode("latin-1"),
            status=self.code,
            sent=self.sentLength,
            duration=clock.seconds() - self.access.started,
            record=self.access,
        )


class MirrordChannel(http.HTTPChannel):
    """An HTTP channel that answers oversized requests itself.

    Twisted's ``LineReceiver`` answers a line over the limit by closing the
    transport while this channel is still its producer; under TLS that close
    waits forever. Answer 431 (413 for a body) and close properly instead.
    """

    def connectionMade(self) -> None:
        super().connectionMade()
        getattr(self.site, "channels", set()).add(self)
        guard = getattr(self.site, "guard", None)
        if guard is not None:
            self._peer = plain_address(getattr(self.transport.getPeer(), "host", "unknown"))
            guard.connection_made(self._peer)

    def connectionLost(self, reason: Any) -> None:
        getattr(self.site, "channels", set()).discard(self)
        guard = getattr(self.site, "guard", None)
        if guard is not None and hasattr(self, "_peer"):
            guard.connection_lost(self._peer)
        super().connectionLost(reason)

    def checkPersistence(self, request: Request, version: bytes) -> bool:
        if version == b"HTTP/1.0":
            tokens = b",".join(request.requestHeaders.getRawHeaders(b"connection", []))
            if b"keep-alive" in (t.strip().lower() for t in tokens.split(b",")):
                # Kept open unless the answer turns out to need a close to
                # end it (``MirrordRequest._keep_alive_1_0``).
                request.keep_alive_1_0 = True  # type: ignore[attr-defined]
                return True
            return False
        return bool(super().checkPersistence(request, version))

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(431, "UNSUPPORTED", "request line or header fields too large")

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted answers a request it cannot parse (request line, header
        # syntax, all headers over totalHeadersSize) with a bare 400 and no
        # body; registry clients get the JSON error here as everywhere else.
        # A private hook: tests/test_fuzz.py fails if Twisted renames it.
        if self._receivedHeaderSize > self.totalHeadersSize:
            self.refuse(431, "UNSUPPORTED", "request header fields too large")
        else:
            self.refuse(400, "UNSUPPORTED", "malformed HTTP request")

    def refuse(self, status: int, code: str, message: str) -> None:
        """Answer with a registry error and close, before any resource runs."""
        body = error_body(code, message)
        reason = http.RESPONSES.get(status, b"Error")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (status, reason, len(body), body)
        )
        self.loseConnection()


class MirrordSite(Site):
    """A ``Site`` whose access log is the structured event of ``MirrordRequest``."""

    requestFactory = MirrordRequest
    protocol = MirrordChannel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard: Guard | None = None
        self.combined_log: accesslog.CombinedLog | None = None
        # (source, bytes) of each body write: the served-bytes metric.
        self.count_body: Callable[[str, int], object] = lambda source, size: None
        self.active: set[Request] = set()
        # Open connections: a graceful stop waits for them to flush and close.
        self.channels: set[http.HTTPChannel] = set()
        self._idle_waiters: list[Deferred[None]] = []

    def began(self, request: Request) -> None:
        self.active.add(request)

    def ended(self, request: Request) -> None:
        self.active.discard(request)
        if not self.active:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def when_idle(self) -> Deferred[None]:
        """Fires once no request is in flight (for a graceful stop)."""
        if not self.active:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def log(self, request: Request) -> None:
        # MirrordRequest logs itself, including requests that never finish.
        pass


class _Healthz(ReadOnlyResource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return b"ok\n"

    render_HEAD = render_GET


class _Root(ReadOnlyResource):
    """``/`` is the usage page; other unknown paths answer a JSON 404."""

    def __init__(self, usage: Callable[[Request], bytes]) -> None:
        super().__init__()
        self._usage = usage

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        return _NotFound()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Content-Security-Policy", CONTENT_SECURITY_POLICY)
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        # The language follows Accept-Language; the figures change by the minute.
        request.setHeader(b"Vary", b"Accept-Language")
        request.setHeader(b"Cache-Control", b"no-store")
        return self._usage(request)

    render_HEAD = render_GET


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> int:
        write_error(request, errors.not_found(request.path.decode("latin-1")))
        return NOT_DONE_YET


def mount_internal(site: MirrordSite, name: bytes, resource: Resource) -> None:
    """Put ``resource`` at ``/_mirrord/<name>``: endpoints for the other
    members of a fleet, which authenticate each request themselves, so
    the guard (allow-list, mirror login, client limits) lets them by."""
    root = site.resource
    tree = root._root if isinstance(root, GuardedRoot) else root
    internal = tree.children.get(b"_mirrord")
    if internal is None:
        internal = Resource()
        tree.putChild(b"_mirrord", internal)
        if isinstance(root, GuardedRoot):
            root.exempt(b"_mirrord")
    internal.putChild(name, resource)


def build_site(
    *,
    registry_proxy: Resource,
    token_proxy: Resource,
    usage: Callable[[Request], bytes],
    metrics: Resource,
    reactor: IReactorTime,
    client_idle: float,
    guard: Guard | None = None,
) -> MirrordSite:
    """The whole tree, wired: the one place that decides what lives where."""
    root = _Root(usage)
    root.putChild(b"v2", registry_proxy)
    root.putChild(b"token", token_proxy)
    root.putChild(b"healthz", _Healthz())
    root.putChild(b"metrics", metrics)
    site = MirrordSite(GuardedRoot(root, guard) if guard else root, reactor=reactor)
    site.guard = guard
    site.timeOut = client_idle
    site.displayTracebacks = False
    return site
