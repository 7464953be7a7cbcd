"""Who may read cached content.

The rule: a cached blob or manifest is served to anyone only if its
repository is public, meaning the mirror itself, with no credentials, could
fetch it (anonymous token included). Content of any other repository is
served from the cache only to a client whose own credentials the upstream
accepted for that repository within the last ``ttl`` seconds (checked with a
HEAD, which is free on Docker Hub). Anyone else is passed through to the
upstream and gets its real answer (a 401, say).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from mirrord import errors
from mirrord.auth import parse_challenge
from mirrord.expiring import Expiring
from mirrord.streaming import discard_body, read_small_body
from mirrord.upstream import RedirectFollower, UpstreamChain

log = Logger()


def _credential(headers: Headers) -> str:
    value = headers.getRawHeaders(b"authorization", [b""])[-1]
    return hashlib.sha256(value).hexdigest() if value else ""


@dataclass
class AccessChecks:
    chain: UpstreamChain
    follower: RedirectFollower
    clock: IReactorTime
    ttl: float = 300.0
    public_ttl: float = 3600.0
    _verified: Expiring[tuple[str, str], bool] = field(init=False)
    _public: Expiring[str, bool] = field(init=False)

    def __post_init__(self) -> None:
        self._verified = Expiring(self.clock.seconds)
        self._public = Expiring(self.clock.seconds)

    def remember(self, headers: Headers, repository: str) -> None:
        """The upstream just accepted these credentials for this repository."""
        self._verified.put((_credential(headers), repository), True, self.ttl)

    def verified(self, headers: Headers, repository: str) -> bool:
        return self._verified.get((_credential(headers), repository)) is not None

    async def allowed(self, headers: Headers, repository: str, public: bool, path: str) -> bool:
        """May this client read cached content of ``repository``?"""
        if public or self.verified(headers, repository):
            return True
        if not headers.hasHeader(b"authorization"):
            return False
        try:
            answer = await self.chain.request(b"HEAD", path, headers)
        except CancelledError:
            raise
        except errors.RegistryError:
            return False
        if answer.body is None:
            discard_body(answer.response, self.clock, self.follower.body_idle)
        if answer.code == 200:
            self.remember(headers, repository)
            return True
        return False

    async def is_public(self, repository: str, path: str) -> bool:
        """Can ``path`` of ``repository`` be read with no credentials at all?"""
        known = self._public.get(repository)
        if known is not None:
            return known
        try:
            public = await self._anonymous_head(path)
        except CancelledError:
            raise
        except Exception as e:
            log.info(
                "publicity check of {repository} failed: {error}", repository=repository, error=e
            )
            return False
        self._public.put(repository, public, self.public_ttl)
        return public

    async def _anonymous_head(self, path: str) -> bool:
        answer = await self.chain.request(b"HEAD", path, Headers())
        if answer.body is None:
            discard_body(answer.response, self.clock, self.follower.body_idle)
        if answer.code == 200:
            return True
        if answer.code != 401:
            return False
        values = answer.headers.getRawHeaders(b"www-authenticate", [])
        challenge = next(
            (c for v in values if (c := parse_challenge(v)) and c.scheme.lower() == "bearer"), None
        )
        if challenge is None or urlsplit(challenge.realm).scheme not in ("http", "https"):
            return False
        query = {k: v for k, v in challenge.params.items() if k in ("service", "scope")}
        separator = "&" if "?" in challenge.realm else "?"
        url = challenge.realm + separator + urlencode(query)
        response, _, _ = await self.follower.fetch(b"GET", url, Headers(), challenge.realm)
        body = await read_small_body(response, self.clock, self.follower.body_idle)
        if response.code != 200:
            return False
        document = json.loads(body)
        token = document.get("token") or document.get("access_token")
        if not token:
            return False
        headers = Headers({b"authorization": [f"Bearer {token}".encode()]})
        answer = await self.chain.request(b"HEAD", path, headers)
        if answer.body is None:
            discard_body(answer.response, self.clock, self.follower.body_idle)
        return answer.code == 200
