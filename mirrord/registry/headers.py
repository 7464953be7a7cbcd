"""Which headers cross the proxy, in each direction.

Both directions are allow-lists: hop-by-hop headers (``Connection``,
``Keep-Alive``, ``Transfer-Encoding``, ...) and anything a registry client
does not need are dropped by construction, and ``Accept-Encoding`` is never
forwarded, so upstream bodies arrive byte-exact for digest checks.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers

FORWARDED_REQUEST_HEADERS = (
    b"authorization",
    b"accept",
    b"range",
    b"if-none-match",
    b"if-modified-since",
    b"user-agent",
)
_FORWARDED = frozenset(FORWARDED_REQUEST_HEADERS)
CREDENTIAL_HEADERS = (b"authorization", b"cookie")

PASSED_RESPONSE_HEADERS = (
    b"content-type",
    b"content-length",
    b"content-range",
    b"accept-ranges",
    b"docker-content-digest",
    b"docker-distribution-api-version",
    b"etag",
    b"last-modified",
    b"retry-after",
    b"link",
    b"ratelimit-limit",
    b"ratelimit-remaining",
    b"ratelimit-reset",
    b"docker-ratelimit-source",
    b"x-ratelimit-limit",
    b"x-ratelimit-remaining",
    b"x-ratelimit-reset",
    b"cache-control",
    b"expires",
)


def upstream_request_headers(client: Headers, client_address: str, secure: bool) -> Headers:
    """Headers for the upstream request made on behalf of a client."""
    # One pass over what the client sent (a handful of headers), rather
    # than a lookup per forwarded name: this runs for every request.
    forwarded: dict[bytes, list[bytes]] = {}
    prior: list[bytes] = []
    for name, values in client.getAllRawHeaders():
        lower = name.lower()
        if lower in _FORWARDED:
            forwarded[lower] = list(values)
        elif lower == b"x-forwarded-for":
            prior = list(values)
    address = client_address.encode()
    forwarded[b"x-forwarded-for"] = [b", ".join([*prior, address])]
    forwarded[b"x-real-ip"] = [address]
    forwarded[b"x-forwarded-proto"] = [b"https" if secure else b"http"]
    return Headers(forwarded)


def without_credentials(headers: Headers) -> Headers:
    """A copy that is safe to send to another origin (a CDN, say)."""
    out = headers.copy()
    for name in CREDENTIAL_HEADERS:
        out.removeHeader(name)
    return out


def client_response_headers(upstream: Headers) -> list[tuple[bytes, list[bytes]]]:
    """The upstream response headers a registry client gets to see."""
    return [
        (name, values)
        for name in PASSED_RESPONSE_HEADERS
        if (values := upstream.getRawHeaders(name))
    ]
