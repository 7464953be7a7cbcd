"""Salted scrypt hashes for mirror login: made, checked and validated
here, with no Twisted (the configuration validates them on load).

``python -m mirrord.passwords`` asks for a password twice and prints the
hash to put under ``[access.users]``.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import os
import sys

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


def main() -> None:
    password = getpass.getpass("password: ")
    if password != getpass.getpass("again: "):
        sys.exit("mirrord: the passwords differ")
    print(make_hash(password))


if __name__ == "__main__":
    main()
