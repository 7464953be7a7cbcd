"""``/token``: the auth proxy for the realms the upstreams announced.

Clients were told (by the rewritten challenge) to fetch tokens here. The
request goes, query and credentials intact, to the real realm that a
configured upstream announced for the requested ``service``; any other
realm is refused, so the mirror cannot be used to reach arbitrary hosts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mirrord import errors
from mirrord.auth import RealmBook, official_scope, rewrite_challenges
from mirrord.config import Registry, Timeouts
from mirrord.login import MirrorLogin
from mirrord.respond import client_host, write_error
from mirrord.streaming import TransferIncomplete, discard_body, read_small_body, relay_body
from mirrord.upstream import RedirectFollower, UpstreamChain

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
        login: MirrorLogin | None = None,
    ) -> None:
        super().__init__()
        self._login = login
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
        work = ensureDeferred(self._serve(request))
        request.notifyFinish().addErrback(lambda _: work.cancel())
        work.addErrback(self._failed, request)
        return NOT_DONE_YET

    async def _serve(self, request: Request) -> None:
        query = request.uri.partition(b"?")[2].decode("latin-1")
        pairs = parse_qsl(query, keep_blank_values=True)
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
        body = None
        if request.method == b"POST":
            form = request.content.read(MAX_TOKEN_FORM + 1)
            if len(form) > MAX_TOKEN_FORM:
                raise errors.RegistryError(413, "SIZE_INVALID", "token form too large")
            body = form
        response, _, _ = await self._follower.fetch(request.method, url, headers, realm, body=body)
        request.setResponseCode(response.code)
        for name in _TOKEN_RESPONSE_HEADERS:
            values = response.headers.getRawHeaders(name)
            if values:
                request.responseHeaders.setRawHeaders(name, values)
        if self._login is not None and getattr(request, "mirror_login", False):
            await self._issue(request, response)
            return
        try:
            await relay_body(request, response, self._clock, self._timeouts)
        except TransferIncomplete:
            pass

    async def _issue(self, request: Request, response: IResponse) -> None:
        """A logged-in client's token: remember it so /v2/ accepts it."""
        assert self._login is not None
        body = await read_small_body(response, self._clock, self._timeouts.body_idle)
        if response.code == 200:
            try:
                document = json.loads(body)
                token = document.get("token") or document.get("access_token")
                if token:
                    self._login.issued(token, float(document.get("expires_in") or 60))
            except (ValueError, AttributeError):
                pass
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
