"""The mirror's own identity upstream: the Bearer tokens it fetches for
itself, with its account when one is configured, anonymously otherwise.

Requests of clients that hold a mirror token (see ``mirrord.tokens``) go
upstream as the mirror. For each upstream the challenge it answers with
(``realm``, ``service``) is learned from its first 401; tokens are then
fetched from that realm per scope (``repository:<name>:pull``), with the
account's ``Basic`` credentials (or the OAuth2 password grant where the
realm wants a POST), kept until shortly before they expire, and fetched
again when the upstream refuses one. The account is used with the
registry's first upstream only, and its password goes to that upstream's
announced realm only: a fallback (mirror.gcr.io, say) never sees it.

A token or password never appears in a log line: tokens are logged by the
scope they are for, accounts by user name.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from mirrord.expiring import Expiring
from mirrord.registry import errors
from mirrord.registry.challenges import KNOWN_REALMS, Challenge, parse_challenge
from mirrord.upstream.bodies import read_small_body

log = Logger()

# Inside mirrord only: marks upstream-bound headers of a request made as
# the mirror. The chain removes it before anything is sent.
MIRROR_IDENTITY = b"x-mirrord-identity"

_REPOSITORY_PATH = re.compile(r"^/v2/(.+)/(?:manifests|blobs|tags)/")
# Seconds before a token's announced expiry that it is no longer used.
EXPIRY_MARGIN = 30.0
# Docker's token spec: a token without expires_in lasts 60 seconds.
DEFAULT_TOKEN_LIFETIME = 60.0


@dataclass(frozen=True)
class Account:
    """The mirror's account with a registry (a Docker Hub access token works as the password)."""

    username: str
    password: str = field(repr=False)


def scope_for(path: str) -> str:
    """The pull scope a ``/v2/`` path needs ("" for ``/v2/`` itself)."""
    match = _REPOSITORY_PATH.match(path)
    return f"repository:{match.group(1)}:pull" if match else ""


def as_mirror(headers: Headers) -> Headers:
    """Headers marked to go upstream as the mirror, without the client's credentials."""
    out = headers.copy()
    out.removeHeader(b"authorization")
    out.setRawHeaders(MIRROR_IDENTITY, [b"1"])
    return out


def is_mirror(headers: Headers) -> bool:
    return headers.hasHeader(MIRROR_IDENTITY)


def bearer_challenge(headers: Headers) -> Challenge | None:
    for value in headers.getRawHeaders(b"www-authenticate", []):
        challenge = parse_challenge(value)
        if challenge is not None and challenge.scheme.lower() == "bearer" and challenge.realm:
            return challenge
    return None


@dataclass
class UpstreamTokens:
    """The mirror's tokens for one upstream."""

    upstream: str
    follower: object  # RedirectFollower (typed loosely: chain imports this module)
    clock: IReactorTime
    account: Account | None = None
    challenge: Challenge | None = None
    _tokens: Expiring[tuple[str, str, str], str] = field(init=False)
    _fetching: dict[tuple[str, str, str], list[Deferred[str]]] = field(init=False)

    def __post_init__(self) -> None:
        self._tokens = Expiring(self.clock.seconds, max_entries=10_000)
        self._fetching = {}

    @property
    def identity(self) -> str:
        """Whom this upstream counts the mirror's pulls against."""
        return self.account.username if self.account else "anonymous"

    def _key(self, challenge: Challenge, scope: str) -> tuple[str, str, str]:
        return challenge.realm, challenge.service, scope

    def cached(self, path: str) -> str | None:
        """A token still good for ``path``, if one is held."""
        if self.challenge is None:
            return None
        return self._tokens.get(self._key(self.challenge, scope_for(path)))

    def learn(self, challenge: Challenge) -> None:
        """Where this upstream's tokens come from (its realm and service)."""
        self.challenge = Challenge(
            challenge.scheme,
            {k: v for k, v in challenge.params.items() if k in ("realm", "service")},
        )

    def refused(self, challenge: Challenge, path: str) -> None:
        """The upstream answered 401: learn its challenge, forget the token used."""
        self.learn(challenge)
        self._tokens.put(self._key(challenge, scope_for(path)), "", 0)

    def fetch(self, path: str) -> Deferred[str]:
        """A fresh token for ``path``: one fetch per scope at a time, however
        many requests want it; a request that leaves only stops waiting."""
        assert self.challenge is not None
        key = self._key(self.challenge, scope_for(path))
        waiters = self._fetching.get(key)
        mine: Deferred[str] = Deferred(lambda d: waiters.remove(d) if d in waiters else None)
        if waiters is not None:
            waiters.append(mine)
            return mine
        waiters = self._fetching[key] = [mine]

        def settled(outcome: str | Failure) -> None:
            del self._fetching[key]
            for waiter in waiters:
                if isinstance(outcome, Failure):
                    waiter.errback(outcome)
                else:
                    waiter.callback(outcome)

        ensureDeferred(self._fetch(self.challenge, key[2])).addBoth(settled)
        return mine

    async def _fetch(self, challenge: Challenge, scope: str) -> str:
        realm = challenge.realm
        if urlsplit(realm).scheme not in ("http", "https"):
            raise errors.bad_gateway(f"upstream {self.upstream} announced no usable token service")
        query = {"service": challenge.service} if challenge.service else {}
        if scope:
            query["scope"] = scope
        headers = Headers({b"user-agent": [b"mirrord"]})
        account = self._account_for(realm)
        if account is not None:
            basic = base64.b64encode(f"{account.username}:{account.password}".encode())
            headers.setRawHeaders(b"authorization", [b"Basic " + basic])
        url = realm + ("&" if "?" in realm else "?") + urlencode(query) if query else realm
        response, _, _ = await self.follower.fetch(b"GET", url, headers, realm)  # type: ignore[attr-defined]
        idle = self.follower.body_idle  # type: ignore[attr-defined]
        body = await read_small_body(response, self.clock, idle)
        if response.code in (404, 405) and account is not None:
            # A realm that takes only the OAuth2 form (as `docker login` sends it).
            form = urlencode(
                {
                    "grant_type": "password",
                    "username": account.username,
                    "password": account.password,
                    "client_id": "mirrord",
                    **query,
                }
            ).encode()
            post = Headers(
                {
                    b"content-type": [b"application/x-www-form-urlencoded"],
                    b"user-agent": [b"mirrord"],
                }
            )
            response, _, _ = await self.follower.fetch(b"POST", realm, post, realm, body=form)  # type: ignore[attr-defined]
            body = await read_small_body(response, self.clock, idle)
        if response.code != 200:
            log.warn(
                "token service {realm} refused the mirror ({identity}) for {scope}: {code}",
                realm=realm,
                identity=self.identity,
                scope=scope or "the registry",
                code=response.code,
            )
            raise errors.bad_gateway(f"token service of {self.upstream} answered {response.code}")
        try:
            document = json.loads(body)
            token = document.get("token") or document.get("access_token")
            lifetime = float(document.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise errors.bad_gateway(f"token service of {self.upstream} sent no token")
        keep = max(lifetime - min(EXPIRY_MARGIN, lifetime / 2), 1.0)
        self._tokens.put(self._key(challenge, scope), token, keep)
        return token

    def _account_for(self, realm: str) -> Account | None:
        """The account's password goes over TLS only (or to a plain-HTTP
        realm of a plain-HTTP upstream: a test or a LAN registry)."""
        if self.account is None:
            return None
        if urlsplit(realm).scheme == "https" or urlsplit(self.upstream).scheme == "http":
            return self.account
        log.warn(
            "not sending the account for {upstream} to {realm} over plain HTTP",
            upstream=self.upstream,
            realm=realm,
        )
        return None


@dataclass
class MirrorIdentity:
    """The mirror's tokens for each upstream of one registry; the account
    (if any) is its first upstream's."""

    follower: object
    clock: IReactorTime
    account: Account | None = None
    _by_upstream: dict[str, UpstreamTokens] = field(default_factory=dict)
    primary: str = ""

    def tokens(self, upstream: str) -> UpstreamTokens:
        tokens = self._by_upstream.get(upstream)
        if tokens is None:
            account = self.account if upstream == self.primary else None
            tokens = UpstreamTokens(upstream, self.follower, self.clock, account)
            known = KNOWN_REALMS.get(upstream)
            if known is not None:
                tokens.learn(known)
            self._by_upstream[upstream] = tokens
        return tokens

    def set_primary(self, upstream: str, account: Account | None = None) -> None:
        """On (re)load: the upstream the account is for, and the account."""
        if upstream != self.primary or account != self.account:
            self._by_upstream.clear()
        self.primary, self.account = upstream, account
