"""The key hosts of one fleet share, and the request signature it makes.

A host asks another for a blob with ``Authorization: MirrordFleet
<unix-ts>:<hex mac>``, the MAC an HMAC-SHA256 over the timestamp, the
method and the request path. The timestamp bounds a replay to the clock
skew allowed (the requests travel over TLS, so a replay needs a captured
plaintext anyway); the method and path bind the signature to one blob.
No Twisted here, and the key never leaves this module: not in a repr, a
log line or an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from pathlib import Path

SCHEME = b"MirrordFleet"
# Shorter keys are guessable offline from one captured signature.
MIN_KEY = 16
_HEADER = re.compile(rb"MirrordFleet ([0-9]{1,12}):([0-9a-f]{64})")


class FleetSecret:
    """The fleet's shared key: signs requests and verifies them."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY:
            raise ValueError(f"a fleet secret needs at least {MIN_KEY} bytes, got {len(key)}")
        self._key = bytes(key)

    @classmethod
    def load(cls, path: str) -> FleetSecret:
        """The key in the file at ``path``, surrounding whitespace stripped
        (a trailing newline is what editors and ``openssl rand`` leave).
        ``ValueError`` for a key that is too short, ``OSError`` if unreadable."""
        key = Path(path).read_bytes().strip()
        if len(key) < MIN_KEY:
            raise ValueError(
                f"the fleet secret in {path} is {len(key)} bytes long;"
                f" at least {MIN_KEY} are needed (e.g. `openssl rand -hex 32`)"
            )
        return cls(key)

    def __repr__(self) -> str:
        return "FleetSecret(<redacted>)"

    def _mac(self, timestamp: bytes, method: bytes, path: bytes) -> bytes:
        message = b"%s\n%s\n%s" % (timestamp, method, path)
        return hmac.new(self._key, message, hashlib.sha256).hexdigest().encode("ascii")

    def sign(self, method: bytes, path: bytes, now: float) -> bytes:
        """The ``Authorization`` value for ``method path`` at time ``now``."""
        timestamp = b"%d" % int(now)
        return b"%s %s:%s" % (SCHEME, timestamp, self._mac(timestamp, method, path))

    def verify(
        self, header: bytes | None, method: bytes, path: bytes, now: float, skew: float = 60.0
    ) -> bool:
        """Whether ``header`` signs ``method path`` with this key, made
        within ``skew`` seconds of ``now`` (either way: hosts' clocks differ)."""
        if header is None:
            return False
        found = _HEADER.fullmatch(header.strip())
        if found is None:
            return False
        timestamp, mac = found.groups()
        if not math.isfinite(now) or abs(now - int(timestamp)) > skew:
            return False
        return hmac.compare_digest(mac, self._mac(timestamp, method, path))
