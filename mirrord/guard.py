"""Not an open relay: who may use the mirror, and how much at once.

Checked for every request before it reaches the resource tree (``/healthz``
excepted): the client's address (taken from ``X-Forwarded-For`` only when
the peer is a trusted proxy) against the allow-list, its ``User-Agent``
against the block patterns, and its connections and requests in flight
against the per-address limits. A refusal is a registry JSON error: 403
``DENIED``, or 429 ``TOOMANYREQUESTS`` with ``Retry-After``; other clients'
requests are never touched.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mirrord import errors
from mirrord.config import Access
from mirrord.login import MirrorLogin
from mirrord.respond import peer_address, write_error

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(values: tuple[str, ...]) -> list[Network]:
    return [ipaddress.ip_network(v, strict=False) for v in values]


def _in(address: str, networks: list[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


BASIC_CHALLENGE = (b"WWW-Authenticate", b'Basic realm="mirrord"')


class Guard:
    """The access policy and the per-address counters it keeps."""

    def __init__(self, access: Access, login: MirrorLogin | None = None) -> None:
        self.access = access
        self.login = login
        self._allowed = _networks(access.allow_clients)
        self._trusted = _networks(access.trusted_proxies)
        self._blocked = [re.compile(p) for p in access.block_user_agents]
        self.connections: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()

    def client_address(self, peer: str, forwarded: list[bytes]) -> str:
        """The real client: walk X-Forwarded-For from the right while the hop
        is a trusted proxy."""
        address = peer
        hops = [h.strip() for v in forwarded for h in v.decode("latin-1").split(",")]
        while hops and _in(address, self._trusted):
            address = hops.pop()
        return address

    def connection_made(self, peer: str) -> None:
        self.connections[peer] += 1

    def connection_lost(self, peer: str) -> None:
        self.connections[peer] -= 1
        if self.connections[peer] <= 0:
            del self.connections[peer]

    def check(self, request: Request, client: str, peer: str) -> errors.RegistryError | None:
        access = self.access
        if self._allowed and not _in(client, self._allowed):
            return errors.denied(f"client {client} is not allowed to use this mirror")
        agent = (request.getHeader(b"user-agent") or b"").decode("latin-1")
        if any(pattern.search(agent) for pattern in self._blocked):
            return errors.denied("this client software is not allowed to use this mirror")
        busy = errors.RegistryError(
            429,
            "TOOMANYREQUESTS",
            "too many at once from your address; retry later",
            retry_after=access.retry_after,
        )
        limit = access.max_connections_per_client
        if limit and self.connections[peer] > limit:
            request.setHeader(b"Connection", b"close")
            return busy
        limit = access.max_requests_per_client
        if limit and self.requests[client] >= limit:
            return busy
        return None

    def authenticate(self, request: Request, path: bytes) -> errors.RegistryError | None:
        """Mirror login on /v2/ and /token; see ``mirrord.login``."""
        login = self.login
        if login is None or not login.enabled or path not in (b"v2", b"token"):
            return None
        header = request.getHeader(b"authorization") or b""
        scheme = header[:7].lower()
        if scheme.startswith(b"basic "):
            if not login.basic_ok(header):
                return errors.RegistryError(401, "UNAUTHORIZED", "wrong mirror credentials")
            # The mirror's credentials are never sent upstream.
            request.requestHeaders.removeHeader(b"authorization")
            request.mirror_login = True  # type: ignore[attr-defined]
            return None
        if path == b"v2" and scheme == b"bearer " and login.token_ok(header[7:].strip()):
            return None
        return errors.RegistryError(401, "UNAUTHORIZED", "log in to this mirror first")


class _Refusal(Resource):
    isLeaf = True

    def __init__(self, error: errors.RegistryError) -> None:
        super().__init__()
        self._error = error

    def render(self, request: Request) -> int:
        if self._error.status == 401:
            request.setHeader(*BASIC_CHALLENGE)
        write_error(request, self._error)
        return NOT_DONE_YET


class GuardedRoot(Resource):
    """Wraps the root resource: every request passes the guard first."""

    def __init__(self, root: Resource, guard: Guard, exempt: tuple[bytes, ...] = (b"healthz",)):
        super().__init__()
        self._root = root
        self._guard = guard
        self._exempt = exempt

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        if path in self._exempt:
            return self._root.getChildWithDefault(path, request)
        refusal = self._admit(request) or self._guard.authenticate(request, path)
        if refusal is not None:
            return _Refusal(refusal)
        return self._root.getChildWithDefault(path, request)

    def render(self, request: Request) -> bytes | int:
        refusal = self._admit(request)
        if refusal is not None:
            return _Refusal(refusal).render(request)
        return self._root.render(request)

    def _admit(self, request: Request) -> errors.RegistryError | None:
        peer = peer_address(request)
        client = self._guard.client_address(
            peer, request.requestHeaders.getRawHeaders(b"x-forwarded-for", [])
        )
        request.client_ip = client  # type: ignore[attr-defined]
        refusal = self._guard.check(request, client, peer)
        if refusal is None:
            guard = self._guard
            guard.requests[client] += 1

            def done(_: object) -> None:
                guard.requests[client] -= 1
                if guard.requests[client] <= 0:
                    del guard.requests[client]

            request.notifyFinish().addBoth(done)
        return refusal
