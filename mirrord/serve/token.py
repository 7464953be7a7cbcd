"""``/token``: tokens for clients, signed here or relayed.

Clients were told (by the mirror's challenges) to fetch tokens here.

- A client without credentials (and one logged in to the mirror) gets a
  token the mirror signs itself (``mirrord.tokens``), for the scopes it
  asked for, without asking any upstream: pulls of cached content then
  work through a complete upstream outage, and each pull saves a round
  trip to the token service. Its requests go upstream as the mirror.
- A client with credentials of its own (``Basic``, or the OAuth2 password
  or refresh-token form) is relayed, query and credentials intact, to the
  real realm that a configured upstream announced for the requested
  ``service``; any other realm is refused, so the mirror cannot be used to
  reach arbitrary hosts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mirrord.config import Registry, Timeouts
from mirrord.registry import errors
from mirrord.registry.challenges import RealmBook, official_scope, rewrite_challenges
from mirrord.registry.respond import client_host, write_error
from mirrord.serve.answer import note_source
from mirrord.tokens import MirrorTokens
from mirrord.upstream.bodies import TransferIncomplete, discard_body, relay_body
from mirrord.upstream.chain import RedirectFollower, UpstreamChain

log = Logger()

MAX_TOKEN_FORM = 64 * 1024
_TOKEN_REQUEST_HEADERS = (b"authorization", b"user-agent", b"accept", b"content-type")
_TOKEN_RESPONSE_HEADERS = (b"content-type", b"cache-control", b"www-authenticate")


@dataclass(frozen=True)
class TokenTarget:
    """A served registry: its upstream chain and the realms it announced."""

    registry: Registry
    chain: UpstreamChain
    realms: RealmBook


class TokenProxy(Resource):
    """Relays token requests (GET and the OAuth2 POST form) to known realms."""

    isLeaf = True

    def __init__(
        self,
        targets: Sequence[TokenTarget],
        follower: RedirectFollower,
        clock: IReactorTime,
        timeouts: Timeouts,
        tokens: MirrorTokens,
        count: Callable[[str], object] = lambda kind: None,
    ) -> None:
        super().__init__()
        self._count = count
        self._tokens = tokens
        self._targets = targets
        self._follower = follower
        self._clock = clock
        self._timeouts = timeouts

    def _find(self, service: str | None) -> tuple[TokenTarget, str] | None:
        """The registry and real realm for a token request's ``service``."""
        found = [(t, realm) for t in self._targets if (realm := t.realms.realm_for(service))]
        if service is None and len(found) != 1:
            return None  # without service, only an unambiguous realm will do
        return found[0] if found else None

    def render(self, request: Request) -> bytes | int:
        if request.method not in (b"GET", b"POST"):
            write_error(
                request,
                errors.RegistryError(405, "UNSUPPORTED", "use GET or POST on /token"),
            )
            return NOT_DONE_YET
        self._count("token")
        work = ensureDeferred(self._serve(request))
        request.notifyFinish().addErrback(lambda _: work.cancel())
        work.addErrback(self._failed, request)
        return NOT_DONE_YET

    async def _serve(self, request: Request) -> None:
        query = request.uri.partition(b"?")[2].decode("latin-1")
        pairs = parse_qsl(query, keep_blank_values=True)
        form = b""
        if request.method == b"POST":
            form = request.content.read(MAX_TOKEN_FORM + 1)
            if len(form) > MAX_TOKEN_FORM:
                raise errors.RegistryError(413, "SIZE_INVALID", "token form too large")
        fields = parse_qsl(form.decode("latin-1"), keep_blank_values=True)
        login = getattr(request, "mirror_login", "")
        if login or not _credentials(request, fields):
            self._sign(request, [v for k, v in [*pairs, *fields] if k == "scope"], login)
            return
        service = next((v for k, v in pairs if k == "service"), None)
        found = self._find(service)
        if found is None:
            await self._discover_realms(request)
            found = self._find(service)
        if found is None:
            raise errors.denied(f"no configured upstream announced a token service {service!r}")
        target, realm = found
        prefix = target.registry.official_prefix
        query = urlencode([(k, official_scope(v, prefix) if k == "scope" else v) for k, v in pairs])
        url = realm + ("&" if "?" in realm else "?") + query if query else realm
        headers = Headers()
        for name in _TOKEN_REQUEST_HEADERS:
            values = request.requestHeaders.getRawHeaders(name)
            if values:
                headers.setRawHeaders(name, values)
        body = form if request.method == b"POST" else None
        response, _, _ = await self._follower.fetch(request.method, url, headers, realm, body=body)
        note_source(request, "upstream")
        request.setResponseCode(response.code)
        for name in _TOKEN_RESPONSE_HEADERS:
            values = response.headers.getRawHeaders(name)
            if values:
                request.responseHeaders.setRawHeaders(name, values)
        try:
            await relay_body(request, response, self._clock, self._timeouts)
        except TransferIncomplete:
            pass

    def _sign(self, request: Request, scopes: list[str], login: str) -> None:
        """A mirror token for ``scopes``: no upstream involved."""
        token, lifetime = self._tokens.issue(scopes, login)
        issued_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._clock.seconds()))
        body = json.dumps(
            {
                "token": token,
                "access_token": token,
                "expires_in": int(lifetime),
                "issued_at": issued_at,
            }
        ).encode()
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.write(body)
        request.finish()

    async def _discover_realms(self, request: Request) -> None:
        """Learn the upstreams' token services by asking ``/v2/`` for a challenge
        (a restarted daemon has not seen one yet)."""
        for target in self._targets:
            try:
                answer = await target.chain.request(b"GET", "/v2/", Headers())
            except errors.RegistryError:
                continue
            challenges = answer.headers.getRawHeaders(b"www-authenticate", [])
            rewrite_challenges(challenges, target.realms, f"https://{client_host(request)}/token")
            if answer.body is None:
                discard_body(answer.response, self._clock, self._timeouts.body_idle)

    def _failed(self, failure: Failure, request: Request) -> None:
        if failure.check(CancelledError):
            return None
        if failure.check(errors.RegistryError):
            write_error(request, failure.value)
            return None
        log.failure("token request failed", failure)
        write_error(request, errors.bad_gateway("token service unreachable"))
        return None


def _credentials(request: Request, form: list[tuple[str, str]]) -> bool:
    """Does the client bring credentials of its own for the upstream?"""
    if request.getHeader(b"authorization") is not None:
        return True
    grant = next((v for k, v in form if k == "grant_type"), "")
    return grant in ("password", "refresh_token")
