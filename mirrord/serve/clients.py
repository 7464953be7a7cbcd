"""Who a ``/v2/`` request comes from, once its registry is known to use
tokens (its upstream announced a token service):

- a holder of a mirror token (``mirrord.tokens``): anonymous; its requests
  go upstream as the mirror (``mirrord.upstream.identity``) and it is
  served public content only;
- a client with credentials of its own (an upstream token from a relayed
  ``/token``, or ``Basic``): passed upstream as it is;
- nobody: answered here with a ``401`` and a challenge pointing at the
  mirror's ``/token``, as the registry would, without asking it.

``/v2/`` itself is answered here too, the same whatever state the
upstreams are in: a client told 200 during an outage and 401 afterwards
would skip the token flow and fail once the upstream is back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from twisted.web.http_headers import Headers
from twisted.web.server import Request

from mirrord.registry import errors
from mirrord.registry.challenges import Challenge, RealmBook
from mirrord.registry.reference import Kind, Reference
from mirrord.registry.respond import API_VERSION, client_host
from mirrord.serve.privacy import AccessChecks
from mirrord.tokens import MirrorTokens, bearer
from mirrord.upstream.chain import UpstreamChain
from mirrord.upstream.identity import as_mirror


@dataclass
class ClientAuth:
    tokens: MirrorTokens
    realms: Mapping[str, RealmBook]  # by registry name
    # By registry name: its chain (whose account the mirror may use) and
    # the check of what anonymous clients may read.
    publicity: Mapping[str, tuple[UpstreamChain, AccessChecks]] = field(default_factory=dict)

    async def admit(
        self, request: Request, registry: str, ref: Reference, name: str, headers: Headers
    ) -> Headers | None:
        """The headers to send upstream for this request, or ``None`` when
        it was answered here."""
        book = self.realms.get(registry)
        service = book.service if book is not None else None
        authorization = request.getHeader(b"authorization")
        token = bearer(authorization)
        grant = self.tokens.check(token) if token else None
        if grant is not None:
            if ref.name and not grant.allows_pull(ref.name, name):
                self._challenge(request, service or registry, ref, "insufficient_scope")
                return None
            if ref.kind is Kind.BASE:
                _welcome(request)
                return None
            if ref.name and not await self._anonymous_may_read(registry, name, headers):
                challenge_anonymous(request, book or RealmBook(), f"repository:{ref.name}:pull")
                return None
            return as_mirror(headers)
        if service is None:
            return headers  # the upstream decides (it may need no tokens at all)
        if authorization is None:
            self._challenge(request, service, ref)
            return None
        if ref.kind is Kind.BASE:
            _welcome(request)
            return None
        return headers

    def admit_now(
        self, request: Request, registry: str, ref: Reference, name: str
    ) -> Literal["client", "mirror"] | None:
        """What ``admit`` would decide, when that needs no one asked and
        answers nothing here: the request goes upstream as the client
        (its headers as they are) or as the mirror (``as_mirror``).
        ``None``: ``admit`` decides (nothing was answered)."""
        if ref.kind is Kind.BASE or not ref.name:
            return None
        authorization = request.getHeader(b"authorization")
        token = bearer(authorization)
        grant = self.tokens.check(token) if token else None
        if grant is not None:
            found = self.publicity.get(registry)
            if not grant.allows_pull(ref.name, name) or (
                found is not None and found[0].account is not None
            ):
                return None
            return "mirror"
        book = self.realms.get(registry)
        if book is not None and book.service is not None and authorization is None:
            return None
        return "client"

    async def _anonymous_may_read(self, registry: str, name: str, headers: Headers) -> bool:
        """With an account the mirror may read what anonymous clients may
        not: only what nobody needs credentials for goes upstream as the
        mirror (checked anonymously, remembered for an hour)."""
        found = self.publicity.get(registry)
        if found is None or found[0].account is None:
            return True  # the mirror is as anonymous as the client
        access = found[1]
        probe = f"/v2/{name}/tags/list"
        return await access.is_public(name, probe)

    def _challenge(self, request: Request, service: str, ref: Reference, error: str = "") -> None:
        params = {"realm": f"https://{client_host(request)}/token", "service": service}
        if ref.name:
            params["scope"] = f"repository:{ref.name}:pull"
        if error:
            params["error"] = error
        _unauthorized(request, params)


def challenge_anonymous(request: Request, realms: RealmBook, scope: str) -> None:
    """What an anonymous client is told of content it may not read: 401
    and a challenge for the scope (from the mirror's ``/token``)."""
    params = {"realm": f"https://{client_host(request)}/token"}
    if realms.service:
        params["service"] = realms.service
    if scope:
        params["scope"] = scope
    _unauthorized(request, params)


def _unauthorized(request: Request, params: dict[str, str]) -> None:
    body = errors.error_body("UNAUTHORIZED", "authentication required")
    request.setResponseCode(401)
    request.setHeader(b"WWW-Authenticate", Challenge("Bearer", params).render())
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.setHeader(*API_VERSION)
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


def _welcome(request: Request) -> None:
    request.setHeader(*API_VERSION)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", b"2")
    if request.method != b"HEAD":
        request.write(b"{}")
    request.finish()
