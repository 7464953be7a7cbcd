"""Bearer challenges: parse them, point their realm at the mirror, remember
where each upstream's token service really is.

Clients authenticate through the mirror: the ``realm`` of every
``WWW-Authenticate: Bearer`` challenge becomes ``https://<host>/token`` and
``/token`` forwards to the realm the upstream announced. The mirror only
relays to realms it has seen in a configured upstream's challenge, keyed by
the challenge's ``service``, so it is never an open relay.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_PARAM_RE = re.compile(r'\s*([A-Za-z][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


@dataclass(frozen=True)
class Challenge:
    scheme: str
    params: dict[str, str]

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def service(self) -> str:
        return self.params.get("service", "")

    def render(self) -> bytes:
        def quote(value: str) -> str:
            return value.replace("\\", "\\\\").replace('"', '\\"')

        params = ",".join(f'{k}="{quote(v)}"' for k, v in self.params.items())
        return f"{self.scheme} {params}".encode()


def parse_challenge(value: bytes) -> Challenge | None:
    """Parse one ``WWW-Authenticate`` value; ``None`` if it is not understood."""
    text = value.decode("latin-1").strip()  # latin-1 decodes any byte
    scheme, _, rest = text.partition(" ")
    if not scheme:
        return None
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        match = _PARAM_RE.match(rest, pos)
        if not match or match.end() == pos:
            return None
        quoted, bare = match.group(2), match.group(3)
        params[match.group(1).lower()] = (
            re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
        )
        pos = match.end()
    return Challenge(scheme, params)


@dataclass
class RealmBook:
    """The token services announced by configured upstreams, by ``service``."""

    _realms: dict[str, str] = field(default_factory=dict)

    def learn(self, challenge: Challenge) -> None:
        realm = challenge.realm
        if urlsplit(realm).scheme in ("http", "https"):
            self._realms[challenge.service] = realm

    def realm_for(self, service: str | None) -> str | None:
        """The real realm for a token request, or ``None`` if none was seen.

        A request without ``service`` is allowed only when exactly one realm
        is known, so it cannot be steered between token services.
        """
        if service is not None:
            return self._realms.get(service)
        realms = set(self._realms.values())
        return realms.pop() if len(realms) == 1 else None

    def __contains__(self, service: str) -> bool:
        return service in self._realms

    @property
    def service(self) -> str | None:
        """The service of the registry's token realm, once one is known:
        then the registry uses tokens, and the mirror answers ``/v2/`` and
        anonymous token requests itself."""
        return next(iter(self._realms), None)


# Token services known without asking: Docker Hub's, so a fresh daemon
# answers /v2/ and /token the same way before the upstream ever answered
# (and during an outage at its first start).
KNOWN_REALMS: dict[str, Challenge] = {
    "https://registry-1.docker.io": Challenge(
        "Bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io"}
    ),
}


def rewrite_challenges(values: list[bytes], book: RealmBook, token_url: str) -> list[bytes]:
    """Point Bearer realms at the mirror's ``/token`` and remember the real ones."""
    out = []
    for value in values:
        challenge = parse_challenge(value)
        if challenge is None or challenge.scheme.lower() != "bearer" or not challenge.realm:
            out.append(value)
            continue
        book.learn(challenge)
        params = dict(challenge.params, realm=token_url)
        out.append(Challenge(challenge.scheme, params).render())
    return out


def official_scope(scope: str, official_prefix: str) -> str:
    """``repository:alpine:pull`` → ``repository:library/alpine:pull`` on Docker Hub."""
    if not official_prefix:
        return scope
    kind, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if kind == "repository" and sep and sep2 and name and "/" not in name:
        return f"{kind}:{official_prefix}/{name}:{actions}"
    return scope
