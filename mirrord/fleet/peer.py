"""Reading a blob from the host of the fleet that is filling (or holds) it.

The client half of ``mirrord.fleet.endpoint``: one signed GET, a bounded
wait for the headers, and the response handed back with its body unread,
so that the caller delivers it into its own ``Fill`` (which verifies the
digest, bounds the body's idleness and resumes after a cut with
``offset``). The body streams: Twisted's ``Agent`` itself, never a
buffering or decoding wrapper (no ``Accept-Encoding``: the bytes must be
the blob's). Whatever is not a usable answer (a refusal, a 404, no
connection, no headers in time, a response that does not say what it
sends) is ``PeerUnavailable``, its body discarded: the caller then goes
elsewhere (the upstream, or waits for the owner's publication).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import ssl
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS, IResponse

from mirrord.fleet.endpoint import DIGEST, META_HEADER
from mirrord.fleet.secret import FleetSecret
from mirrord.store.disk import Meta
from mirrord.store.fill import range_start
from mirrord.upstream.bodies import discard_body, read_small_body

log = Logger()

PREFIX = "/_mirrord/fleet"
USER_AGENT = b"mirrord-fleet"


class PeerUnavailable(Exception):
    """The other host cannot send the blob now; the message says why."""


def trust(tls_ca: str | None) -> IPolicyForHTTPS:
    """Verify peers against the CA certificates in ``tls_ca`` (PEM, one or
    more), else against the system's; host names (and IP addresses) are
    checked either way. Reads the file: call it at startup, not per request."""
    if not tls_ca:
        return BrowserLikePolicyForHTTPS()
    pem = Path(tls_ca).read_bytes()
    end = b"-----END CERTIFICATE-----"
    roots = [
        ssl.Certificate.loadPEM(block + end + b"\n")
        for block in pem.split(end)
        if b"-----BEGIN CERTIFICATE-----" in block
    ]
    if not roots:
        raise ValueError(f"{tls_ca}: holds no PEM certificate")
    return BrowserLikePolicyForHTTPS(ssl.trustRootFromCertificates(roots))


def parse_meta(value: bytes | None) -> Meta:
    """``X-Mirrord-Meta`` back into a ``Meta``; ``ValueError`` if it is not one."""
    if value is None:
        raise ValueError("no X-Mirrord-Meta header")
    record = json.loads(value)
    fields = {f: type(v) for f, v in vars(Meta()).items()}
    if not isinstance(record, dict) or set(record) != set(fields):
        raise ValueError(f"X-Mirrord-Meta has the wrong fields: {value[:200]!r}")
    for name, kind in fields.items():
        if type(record[name]) is not kind:
            raise ValueError(f"X-Mirrord-Meta {name} is not a {kind.__name__}")
    return Meta(**record)


class PeerClient:
    """Signed requests to the fleet endpoint of other hosts.

    ``deadline`` bounds each request until its response headers, on
    ``reactor``'s clock; the body's pace is the caller's to bound. ``pool``
    (an ``HTTPConnectionPool``) is shared if given, else one of its own,
    closed by ``close``."""

    def __init__(
        self,
        reactor: Any,
        secret: FleetSecret,
        tls_ca: str | None,
        deadline: float = 5.0,
        pool: HTTPConnectionPool | None = None,
    ) -> None:
        self._reactor = reactor
        self._secret = secret
        self._deadline = deadline
        self._own_pool = pool is None
        # Not persistent: each request is one long transfer, and a kept-alive
        # idle connection held the other member's graceful stop until its
        # grace period ended (it waits for every connection to close).
        self._pool = pool if pool is not None else HTTPConnectionPool(reactor, persistent=False)
        self._agent = Agent(reactor, contextFactory=trust(tls_ca), pool=self._pool)

    async def get_blob(
        self, advertise: str, digest: str, offset: int = 0
    ) -> tuple[IResponse, Meta]:
        """The response of ``advertise`` for ``digest`` from byte ``offset``
        (200 for the whole blob, 206 for the rest), its body unread, and the
        blob's ``Meta``; or ``PeerUnavailable``. Deliver the body at once
        (``deliverBody``): until then Twisted holds the connection paused,
        and the other host cuts a reader paused for its ``client_idle``."""
        if DIGEST.fullmatch(digest.encode("ascii", "replace")) is None:
            raise ValueError(f"not a sha256 digest: {digest!r}")
        headers = {}
        if offset > 0:
            headers[b"Range"] = [b"bytes=%d-" % offset]
        response = await self._request(advertise, f"{PREFIX}/blobs/{digest}", headers)
        try:
            if response.code not in (200, 206):
                raise PeerUnavailable(f"{advertise} answered {response.code} for {digest}")
            if response.code == 206:
                span = range_start(response.headers)
                if span is None or span[0] != offset:
                    raise PeerUnavailable(
                        f"{advertise} sent a range {span} of {digest}, asked from {offset}"
                    )
            said = response.headers.getRawHeaders(b"docker-content-digest", [b""])[-1]
            if said != digest.encode("ascii"):
                raise PeerUnavailable(f"{advertise} sent {said[:80]!r} for {digest}")
            try:
                meta = parse_meta(response.headers.getRawHeaders(META_HEADER, [None])[-1])
            except ValueError as e:  # json's errors are ValueErrors too
                raise PeerUnavailable(f"{advertise}: {e}") from None
        except PeerUnavailable:
            discard_body(response, self._reactor, self._deadline)
            raise
        return response, meta

    async def health(self, advertise: str) -> bool:
        """Whether ``advertise`` answers its health check, with our key."""
        try:
            response = await self._request(advertise, f"{PREFIX}/health", {})
        except PeerUnavailable as e:
            log.info("fleet peer {peer} unhealthy: {why}", peer=advertise, why=str(e))
            return False
        try:
            body = await read_small_body(response, self._reactor, self._deadline, 4096)
            healthy = response.code == 200 and json.loads(body) == {"ok": True}
        except CancelledError:
            raise
        except Exception as e:
            log.info("fleet peer {peer} unhealthy: {why!r}", peer=advertise, why=e)
            return False
        if not healthy:
            log.info("fleet peer {peer} answered {code}", peer=advertise, code=response.code)
        return healthy

    async def _request(
        self, advertise: str, path: str, headers: dict[bytes, list[bytes]]
    ) -> IResponse:
        """A signed GET of ``path`` on ``advertise``, until its headers."""
        url = advertise.rstrip("/") + path
        full_path = urlsplit(url).path.encode("ascii")
        signed = Headers(headers)
        signed.setRawHeaders(b"user-agent", [USER_AGENT])
        signed.setRawHeaders(
            b"authorization", [self._secret.sign(b"GET", full_path, self._reactor.seconds())]
        )
        asked = self._agent.request(b"GET", url.encode("ascii"), signed)
        # Not ``addTimeout``: a cancelled Agent request fails with
        # ResponseNeverReceived, not CancelledError, once it is on the wire.
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            asked.cancel()

        timer = self._reactor.callLater(self._deadline, expire)
        try:
            return await asked
        except Exception as e:
            if expired:
                raise PeerUnavailable(
                    f"{advertise}: no answer within {self._deadline:g}s"
                ) from None
            if isinstance(e, CancelledError):
                raise  # our caller gave up
            raise PeerUnavailable(f"{advertise}: {e!r}") from None
        finally:
            if timer.active():
                timer.cancel()

    def close(self) -> Any:
        """Close the pool's idle connections, if the pool is this client's own."""
        if self._own_pool:
            return self._pool.closeCachedConnections()
        return None
