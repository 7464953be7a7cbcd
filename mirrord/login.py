"""Mirror login: HTTP basic auth against salted scrypt hashes in the
configuration, coexisting with the upstreams' bearer tokens.

With ``[access.users]`` set, every ``/v2/`` and ``/token`` request needs
either the mirror's basic credentials (stripped before anything goes
upstream: they are the mirror's, not the upstream's) or a bearer token that
``/token`` handed to a logged-in client. A client without either gets 401
with ``WWW-Authenticate: Basic``; Docker, containerd and podman then send
the credentials of ``docker login <mirror>``.

``python -m mirrord.login`` makes a hash for the configuration.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import os
import sys
from collections.abc import Callable, Mapping

from mirrord.expiring import Expiring

SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1


def make_hash(password: str, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    encode = base64.b64encode
    return (
        f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${encode(salt).decode()}${encode(digest).decode()}"
    )


def check_hash(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def valid_hash(stored: str) -> bool:
    parts = stored.split("$")
    return len(parts) == 6 and parts[0] == "scrypt" and all(x.isdigit() for x in parts[1:4])


class MirrorLogin:
    """Checks credentials, remembering answers for a while: scrypt is slow on
    purpose, and a pull makes hundreds of requests."""

    def __init__(self, users: Mapping[str, str], now: Callable[[], float], ttl: float = 300.0):
        self.users = users
        self._ttl = ttl
        self._answers: Expiring[bytes, bool] = Expiring(now)
        self._tokens: Expiring[bytes, bool] = Expiring(now)

    @property
    def enabled(self) -> bool:
        return bool(self.users)

    def basic_ok(self, header: bytes) -> bool:
        key = hashlib.sha256(header).digest()
        known = self._answers.get(key)
        if known is not None:
            return known
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        stored = self.users.get(user)
        ok = stored is not None and check_hash(password, stored)
        self._answers.put(key, ok, self._ttl)
        return ok

    def issued(self, token: str, expires_in: float) -> None:
        self._tokens.put(hashlib.sha256(token.encode()).digest(), True, expires_in)

    def token_ok(self, token: bytes) -> bool:
        return self._tokens.get(hashlib.sha256(token).digest()) is not None


def main() -> None:
    password = getpass.getpass("password: ")
    if password != getpass.getpass("again: "):
        sys.exit("mirrord: the passwords differ")
    print(make_hash(password))


if __name__ == "__main__":
    main()
