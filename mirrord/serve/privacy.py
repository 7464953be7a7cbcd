"""Who may read cached content.

The rule: a cached blob or manifest is served to anyone only if it is
public, meaning the mirror itself, with no credentials, could fetch it from
the repository it came from (anonymous token included). Anything else is
served from the cache only to a client the upstream accepted for that
content:

- its credentials were accepted, within the last ``ttl`` seconds, for the
  repository (of this registry) the content was fetched from; or
- a HEAD of the path the client asked for, sent upstream with the client's
  own credentials (free on Docker Hub), answered 200: the upstream would
  give this client this digest in that repository.

Being accepted for *some* repository is not enough: a client that pulled
``library/alpine`` does not get another user's private blob by asking for
its digest under ``library/alpine``. Everyone else gets the upstream's own
answer to that HEAD (401, 404, ...).
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

from mirrord.expiring import Expiring
from mirrord.registry.challenges import parse_challenge
from mirrord.store.disk import Meta
from mirrord.upstream.bodies import discard_body, read_small_body
from mirrord.upstream.chain import Answer, RedirectFollower, UpstreamChain
from mirrord.upstream.identity import is_mirror, scope_for

log = Logger()


def credential_of(headers: Headers) -> str:
    """Who is asking, as far as the upstream can tell: a hash of the
    credentials, "mirror" for clients that go upstream as the mirror, ""
    for none."""
    if is_mirror(headers):
        return "mirror"
    value = headers.getRawHeaders(b"authorization", [b""])[-1]
    return hashlib.sha256(value).hexdigest() if value else ""


class AnonymousRefusal:
    """A client going upstream as the mirror asked for content that is not
    public: it is told what an anonymous client is told (401)."""


ANONYMOUS = AnonymousRefusal()


@dataclass
class AccessChecks:
    chain: UpstreamChain
    follower: RedirectFollower
    clock: IReactorTime
    ttl: float = 300.0
    public_ttl: float = 3600.0
    registry: str = ""
    _verified: Expiring[tuple[str, str], bool] = field(init=False)
    _confirmed: Expiring[tuple[str, str], bool] = field(init=False)
    _public: Expiring[str, bool] = field(init=False)

    def __post_init__(self) -> None:
        self._verified = Expiring(self.clock.seconds)
        self._confirmed = Expiring(self.clock.seconds)
        self._public = Expiring(self.clock.seconds)

    def remember(self, headers: Headers, repository: str) -> None:
        """The upstream just accepted these credentials for this repository.
        The mirror's own acceptance is never remembered: it may be its
        account's, which anonymous clients do not share."""
        if not is_mirror(headers):
            self._verified.put((credential_of(headers), repository), True, self.ttl)

    def verified(self, headers: Headers, repository: str) -> bool:
        if is_mirror(headers):
            return False
        return self._verified.get((credential_of(headers), repository)) is not None

    def allowed_now(self, headers: Headers, meta: Meta, path: str) -> bool:
        """Does ``check`` let this client read it without asking anyone?
        (``False`` says only that the answer needs ``check``.)"""
        if meta.public:
            return True
        if is_mirror(headers):
            return False
        credential = credential_of(headers)
        if (
            meta.registry == self.registry
            and self._verified.get((credential, meta.repository)) is not None
        ):
            return True
        return self._confirmed.get((credential, path)) is not None

    async def check(
        self, headers: Headers, meta: Meta, path: str
    ) -> Answer | AnonymousRefusal | None:
        """May this client read cached content described by ``meta`` at
        ``path``? ``None`` if so; otherwise the upstream's refusal (a
        HEAD answer, body already let go) to pass on, or ``ANONYMOUS`` for
        a client that goes upstream as the mirror. Upstream failures raise
        ``RegistryError``."""
        if meta.public:
            return None
        if is_mirror(headers) and self.chain.account is not None:
            # The mirror's account may read what anonymous clients may not:
            # ask as nobody instead.
            name = scope_for(path).removeprefix("repository:").removesuffix(":pull")
            return None if name and await self.is_public(name, path) else ANONYMOUS
        if meta.registry == self.registry and self.verified(headers, meta.repository):
            return None
        credential = credential_of(headers)
        if self._confirmed.get((credential, path)):
            return None
        answer = await self.chain.request(b"HEAD", path, headers)
        if answer.body is None:
            discard_body(answer.response, self.clock, self.follower.body_idle)
        if answer.code != 200:
            return answer
        self._confirmed.put((credential, path), True, self.ttl)
        return None

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
