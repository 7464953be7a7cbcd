"""HTTP-01, the optional alternative to TLS-ALPN-01: a plain HTTP listener
(port 80) that answers only ``/.well-known/acme-challenge/<token>`` with
the key authorization while a validation is in progress, and 404 to
anything else: it serves no registry traffic in the clear."""

from __future__ import annotations

import threading

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

PREFIX = b"/.well-known/acme-challenge/"
# An idle connection on the challenge port is dropped after this long.
IDLE_TIMEOUT = 30


class HTTP01Responder(Resource):
    """The tokens being validated. The ACME worker thread adds and removes
    them; the reactor thread answers from them, so a lock guards them."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._tokens: dict[bytes, bytes] = {}

    def add(self, token: str, key_authorization: str) -> None:
        with self._lock:
            self._tokens[token.encode("ascii")] = key_authorization.encode("ascii")

    def remove(self, token: str) -> None:
        with self._lock:
            self._tokens.pop(token.encode("ascii"), None)

    def render_GET(self, request: Request) -> bytes:
        path = request.path or b""
        with self._lock:
            answer = self._tokens.get(path[len(PREFIX) :]) if path.startswith(PREFIX) else None
        if answer is None:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain")
            return b"not found\n"
        request.setHeader(b"content-type", b"application/octet-stream")
        return answer

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)


def challenge_site(responder: HTTP01Responder) -> Site:
    site = Site(responder, timeout=IDLE_TIMEOUT)
    site.displayTracebacks = False
    return site
