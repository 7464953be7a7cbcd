"""Tokens the mirror signs itself for anonymous clients (and for clients
logged in to the mirror): ``/token`` answers them without asking any
upstream, so a pull of cached content needs no upstream at all, and every
pull saves a round trip to the upstream's token service.

A mirror token says only "anonymous, for these scopes, until then": the
request it carries goes upstream as the mirror's own identity (its account
or an anonymous upstream token), and the privacy rule serves such a client
public content only. The format is ``mirrord.<payload>.<mac>``: base64url
JSON and an HMAC-SHA256 over it with a key kept in the state directory
(mode 0600), so tokens survive a restart and every process of one host
accepts them. No Twisted here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

PREFIX = "mirrord."
LIFETIME = 300.0


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Grant:
    """What a valid mirror token grants."""

    scopes: tuple[str, ...]
    expires: float
    login: str = ""  # the mirror user it was issued to, if any

    def allows_pull(self, *names: str) -> bool:
        """Does it cover pulling one of ``names`` (``library/alpine`` or ``alpine``)?"""
        for scope in self.scopes:
            kind, _, rest = scope.partition(":")
            repository, _, actions = rest.rpartition(":")
            if kind == "repository" and repository in names and "pull" in actions.split(","):
                return True
        return False


class MirrorTokens:
    """Signs and checks mirror tokens with one key."""

    def __init__(self, key: bytes, now: Callable[[], float], lifetime: float = LIFETIME) -> None:
        self._key = key
        self._now = now
        self.lifetime = lifetime

    @classmethod
    def from_state(cls, directory: Path, now: Callable[[], float]) -> MirrorTokens:
        """The key in ``directory/token.key``, made on first use (0600)."""
        path = directory / "token.key"
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            directory.mkdir(parents=True, exist_ok=True)
            key = secrets.token_bytes(32)
            temp = path.with_name(f".token.key.{os.getpid()}")
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(temp, path)  # another process may have made one first
            except FileExistsError:
                pass
            temp.unlink()
            key = path.read_bytes()
        if len(key) < 32:
            raise ValueError(f"{path}: a token key needs at least 32 bytes")
        return cls(key, now)

    def issue(self, scopes: Iterable[str], login: str = "") -> tuple[str, float]:
        """A token for ``scopes`` and how many seconds it lasts."""
        claims = {"s": sorted(set(scopes)), "e": round(self._now() + self.lifetime)}
        if login:
            claims["u"] = login
        payload = _encode(json.dumps(claims, separators=(",", ":")).encode())
        return f"{PREFIX}{payload}.{self._mac(payload)}", self.lifetime

    def check(self, token: str) -> Grant | None:
        """The grant of a valid, unexpired mirror token; ``None`` otherwise."""
        if not token.startswith(PREFIX):
            return None
        payload, _, mac = token[len(PREFIX) :].partition(".")
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        try:
            claims = json.loads(_decode(payload))
            scopes = tuple(str(s) for s in claims["s"])
            expires = float(claims["e"])
            login = str(claims.get("u", ""))
        except (ValueError, KeyError, TypeError):
            return None
        if expires <= self._now():
            return None
        return Grant(scopes, expires, login)

    def _mac(self, payload: str) -> str:
        return _encode(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())


def bearer(authorization: bytes | None) -> str | None:
    """The token of a ``Bearer`` Authorization value, if it is one."""
    if not authorization or authorization[:7].lower() != b"bearer ":
        return None
    return authorization[7:].strip().decode("latin-1")
