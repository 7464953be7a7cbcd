"""AWS Signature Version 4 for S3 requests, computed by botocore, sent by Twisted.

botocore's signers work on an ``AWSRequest`` and do no I/O of their own,
so mirrord signs with them and sends the bytes through its own ``Agent``
(as opensearch-py's request signer does for its non-boto clients). The
payload hash is the caller's: the body of a multipart part is hashed in
a thread, never on the reactor, and botocore would otherwise hash it
again by reading it.

URLs are built here too, so that the path and query the server sees are
exactly the ones signed: S3 does not normalise paths, so a key is
percent-encoded once, everything but RFC 3986 unreserved characters and
``/``, and query values likewise.
"""

from __future__ import annotations

import hashlib
from urllib.parse import quote, urlsplit

from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


def quote_key(key: str) -> str:
    """A key as it goes in a path-style URL (and in the signature)."""
    return quote(key, safe="/-_.~")


def query_string(params: dict[str, str]) -> str:
    """A query string with every name and value encoded as SigV4 expects
    (sorted, so the order sent is the canonical one)."""
    return "&".join(
        f"{quote(name, safe='-_.~')}={quote(value, safe='-_.~')}"
        for name, value in sorted(params.items())
    )


def host_header(url: str) -> str:
    """The Host header for ``url``: the port only when it is not the default."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = 443 if parts.scheme == "https" else 80
    if parts.port is not None and parts.port != default:
        return f"{host}:{parts.port}"
    return host


class _KnownPayload(S3SigV4Auth):
    """S3SigV4Auth with the payload hash given rather than computed."""

    def __init__(self, credentials: Credentials, region: str, payload_sha256: str) -> None:
        super().__init__(credentials, "s3", region)
        self._payload_sha256 = payload_sha256

    def payload(self, request: AWSRequest) -> str:
        return self._payload_sha256


class Signer:
    """Signs requests for one set of credentials in one region."""

    def __init__(self, access_key: str, secret_key: str, region: str) -> None:
        self._credentials = Credentials(access_key, secret_key)
        self._region = region

    def sign(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        payload_sha256: str = EMPTY_SHA256,
    ) -> dict[str, str]:
        """The headers to send: ``headers`` plus Host, X-Amz-Date,
        X-Amz-Content-SHA256 and Authorization. Every header given is
        signed; Content-Length is not (the Agent sets it from the body)."""
        headers = {"Host": host_header(url), **headers}
        request = AWSRequest(method=method, url=url, headers=headers)
        _KnownPayload(self._credentials, self._region, payload_sha256).add_auth(request)
        return dict(request.headers.items())

    def presign(self, url: str, expires: int, method: str = "GET") -> str:
        """``url`` with a query signature valid for ``expires`` seconds; the
        server refuses it afterwards."""
        request = AWSRequest(method=method, url=url)
        S3SigV4QueryAuth(self._credentials, "s3", self._region, expires=expires).add_auth(request)
        return str(request.url)
