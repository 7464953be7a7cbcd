"""A Twisted-native S3 client: every call has a deadline and goes through a breaker.

An S3 store is a second tier that must never make a client wait: a
frozen RGW accepts a request and never answers it (FLEET.md), so each
call here is bounded by ``deadline`` on the injected clock, and repeated
failures open a ``Breaker`` that then refuses calls at once. Deadline
misses, connection failures and 5xx answers are ``S3Unavailable`` (the
caller falls back to its local tier and the upstream); other error
answers are ``S3Error`` with the HTTP status and S3's ``<Code>``. A 404
is an answer, so it never counts against the breaker.

Requests are signed by botocore (``signing``) and sent by a plain
Twisted ``Agent`` of the client's own, with a persistent pool. Not
through treq's ``HTTPClient``: it always wraps its agent in a
``ContentDecoderAgent``, which asks for gzip and would inflate an object
stored with ``Content-Encoding: gzip`` (a blob must arrive byte for
byte), and it re-encodes URLs through hyperlink, while SigV4 signs the
exact path and query sent. Addressing is path-style (endpoint/bucket/key),
which RGW on loopback needs.

Bodies: ``get`` returns the response once its headers are in, unread, for
the caller to ``deliverBody`` with backpressure; small bodies (errors,
listings, manifests) are read with a size limit. Multipart uploads read
and hash one part at a time in ``run`` (a thread), so at most two parts
are in memory: the one being sent and the next.
"""

from __future__ import annotations

import base64
import builtins
import calendar
import functools
import hashlib
import json
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar
from xml.sax.saxutils import escape

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredSemaphore,
    fail,
)
from twisted.internet.error import ConnectError, ConnectingCancelledError, ConnectionClosed
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    PotentialDataLoss,
    ResponseDone,
    _WrapperException,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from mirrord.store.s3.breaker import Breaker, S3Unavailable
from mirrord.store.s3.signing import EMPTY_SHA256, Signer, query_string, quote_key
from mirrord.tuning import UpstreamEndpoints

T = TypeVar("T")
P = ParamSpec("P")

# Error answers, listings and completion results are small; a bigger body
# is not S3 talking.
SMALL_BODY = 1 << 20
# Hashing a body this small on the reactor costs less than a thread hop.
INLINE_HASH = 64 << 10
# S3 allows 10,000 parts of at least 5 MiB (the last excepted).
MAX_PARTS = 10_000
MIN_PART = 5 << 20
# Pages of a listing: 1000 keys each, so a million keys at most per call.
MAX_PAGES = 1000
# RGW's beast frontend closes idle connections after 65 s; a PUT on a
# connection the server has just closed is not retried by Twisted.
IDLE_CONNECTION = 20


class S3Error(Exception):
    """S3 answered with an error that is not about its availability."""

    def __init__(self, code: int, s3_code: str, message: str = "") -> None:
        super().__init__(f"{code} {s3_code} {message}".strip())
        self.code = code
        self.s3_code = s3_code
        self.message = message


@dataclass(frozen=True)
class ObjectInfo:
    """An object's headers, as HEAD tells them. ``etag`` is unquoted."""

    size: int
    etag: str
    content_type: str
    metadata: dict[str, str]
    last_modified: str


def pack_meta(value: Any) -> str:
    """A JSON-able value as one ASCII header value (base64url of compact JSON),
    for metadata that may hold any text."""
    raw = json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii")


def unpack_meta(header: str) -> Any:
    """The inverse of ``pack_meta``; ``ValueError`` when it is not one."""
    try:
        return json.loads(base64.urlsafe_b64decode(header.encode("ascii")))
    except (UnicodeError, ValueError) as e:  # binascii.Error is a ValueError
        raise ValueError(f"not a packed metadata value: {header[:40]!r}") from e


def _meta_headers(metadata: dict[str, str]) -> dict[str, str]:
    headers = {}
    for name, value in metadata.items():
        # Letters, digits and dashes only: proxies may drop headers with
        # underscores, and S3 lowercases the names.
        if not name or not all(c.isascii() and (c.isalnum() or c == "-") for c in name):
            raise ValueError(f"metadata name {name!r} is not letters, digits and dashes")
        if not value.isascii() or not value.isprintable():
            raise ValueError(f"metadata {name!r} is not printable ASCII: use pack_meta")
        headers[f"x-amz-meta-{name.lower()}"] = value
    return headers


def parse_time(text: str) -> float:
    """Seconds since the epoch from S3's ISO 8601 times (2026-12-03T12:00:00.000Z)."""
    base = text.split(".")[0].rstrip("Z")
    return float(calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")))


def _xml(body: bytes) -> ET.Element:
    root = ET.fromstring(body)
    for element in root.iter():
        # S3 puts everything in its 2006-03-01 namespace; the names suffice.
        if isinstance(element.tag, str) and "}" in element.tag:
            element.tag = element.tag.split("}", 1)[1]
    return root


def _text(element: ET.Element, name: str) -> str:
    return element.findtext(name) or ""


def _header(response: IResponse, name: bytes) -> str:
    values = response.headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else ""


@implementer(IBodyProducer)
class _BytesProducer:
    """A body already in memory, written in slices as the transport asks.

    Written in one go, a 16 MiB part would be joined into a second 16 MiB
    buffer by the transport (measured: three parts' worth in memory with
    the read-ahead); in slices, paused when the transport's buffer is
    full, the transport holds a slice or two."""

    SLICE = 256 << 10

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)
        self._offset = 0
        self._paused = self._writing = self._stopped = False
        self._consumer: Any = None
        self._finished: Deferred[None] | None = None

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self._consumer = consumer
        finished: Deferred[None] = Deferred()
        self._finished = finished
        self._write()
        return finished

    def _write(self) -> None:
        if self._writing:  # a write that paused and resumed us
            return
        self._writing = True
        try:
            while not (self._paused or self._stopped) and self._offset < self.length:
                chunk = self._data[self._offset : self._offset + self.SLICE]
                self._offset += len(chunk)
                self._consumer.write(chunk)
        finally:
            self._writing = False
        if self._offset >= self.length and not self._stopped and self._finished is not None:
            finished, self._finished = self._finished, None
            self._data = b""
            finished.callback(None)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._finished is not None:
            self._write()

    def stopProducing(self) -> None:
        # IBodyProducer: the Deferred from startProducing must not fire now.
        self._stopped = True
        self._data = b""


class _Collect(Protocol):
    """Collects a body up to ``limit`` bytes; stops the transport past it,
    or when the read is cancelled (cancelling a collecting Deferred does
    not stop the download by itself)."""

    def __init__(self, finished: Deferred[bytes], limit: int, code: int) -> None:
        self.finished: Deferred[bytes] | None = finished
        self.limit = limit
        self.code = code
        self.size = 0
        self.chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        if self.finished is None:
            return
        self.size += len(data)
        if self.size > self.limit:
            finished, self.finished = self.finished, None
            self.transport.stopProducing()  # type: ignore[union-attr]
            finished.errback(S3Error(self.code, "BodyTooLarge", f"over {self.limit} bytes"))
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if self.finished is None:
            return
        finished, self.finished = self.finished, None
        if reason.check(ResponseDone, PotentialDataLoss):
            finished.callback(b"".join(self.chunks))
        else:
            finished.errback(reason)

    def cancel(self) -> None:
        if self.finished is not None:
            self.finished = None
            self.transport.stopProducing()  # type: ignore[union-attr]


def read_body(response: IResponse, limit: int) -> Deferred[bytes]:
    """The whole body of ``response``, at most ``limit`` bytes (S3Error past it)."""
    if response.length is not UNKNOWN_LENGTH and response.length > limit:
        response.deliverBody(_Discard())
        return fail(S3Error(response.code, "BodyTooLarge", f"{response.length} bytes"))
    collect: _Collect

    def cancel(d: Deferred[bytes]) -> None:
        collect.cancel()

    finished: Deferred[bytes] = Deferred(cancel)
    collect = _Collect(finished, limit, response.code)
    response.deliverBody(collect)
    return finished


class _Discard(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


@implementer(IPolicyForHTTPS)
class TrustCA:
    """Verify the server against the given CA bundle only."""

    def __init__(self, path: str) -> None:
        from twisted.internet.ssl import Certificate, trustRootFromCertificates

        with open(path, "rb") as f:
            pem = f.read()
        marker = b"-----BEGIN CERTIFICATE-----"
        certificates = [Certificate.loadPEM(marker + part) for part in pem.split(marker)[1:]]
        if not certificates:
            raise ValueError(f"no certificate in {path}")
        self._root = trustRootFromCertificates(certificates)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        from twisted.internet.ssl import optionsForClientTLS

        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._root)


# Failures that say S3 cannot be reached or does not answer in time.
_UNAVAILABLE = (
    ConnectError,
    ConnectionClosed,
    _WrapperException,  # ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed
    S3Unavailable,
)


def _read_part(path: str, offset: int, length: int) -> tuple[bytes, str]:
    """One part of a file and its SHA-256 (runs in a thread)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise OSError(f"{path} ended at {offset + len(data)}, expected {offset + length} bytes")
    return data, hashlib.sha256(data).hexdigest()


def _deferred(f: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Deferred[T]]:
    """Make a coroutine method return a Deferred, as the others do (so a
    caller can add callbacks, cancel, or await it alike)."""

    @functools.wraps(f)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        return Deferred.fromCoroutine(f(*args, **kwargs))

    return wrapper


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class S3Client:
    """One bucket of one S3-compatible service, seen through a key prefix."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        endpoint: str,
        bucket: str,
        region: str,
        access_key: str,
        secret_key: str,
        *,
        prefix: str = "",
        tls_ca: str | None = None,
        deadline: float = 10.0,
        breaker: Breaker | None = None,
        run: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        if deadline <= 0:
            raise ValueError("deadline must be positive")
        self._reactor = reactor
        self.endpoint = endpoint.rstrip("/")
        self.bucket = bucket
        self.prefix = prefix
        self.deadline = deadline
        self.breaker = breaker if breaker is not None else Breaker(reactor)
        self._region = region
        self._signer = Signer(access_key, secret_key, region)
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 32
        self._pool.cachedConnectionTimeout = IDLE_CONNECTION
        policy = TrustCA(tls_ca) if tls_ca else BrowserLikePolicyForHTTPS()
        # The upstream side's endpoints: large socket reads (a blob from S3
        # reaches its fill in 1 MiB pieces, not 64 KiB ones).
        self._agent = Agent.usingEndpointFactory(
            reactor, UpstreamEndpoints(reactor, policy, deadline), pool=self._pool
        )
        self._threads: ThreadPool | None = None
        self._queue = DeferredSemaphore(4)
        self._run = run if run is not None else self._in_thread
        # Keys per ListObjectsV2 page (S3's maximum; tests lower it).
        self.page_size = 1000
        # Requests put on the wire, for metrics (and for tests: an open
        # breaker sends none).
        self.requests = 0

    # -- plumbing ---------------------------------------------------------

    def _in_thread(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """The default ``run``: two threads of the client's own, at most
        four jobs queued or running (each may hold a part in memory)."""
        if self._threads is None:
            self._threads = ThreadPool(minthreads=0, maxthreads=2, name="mirrord-s3")
            self._threads.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self._stop_threads)
        threads = self._threads
        return self._queue.run(lambda: deferToThreadPool(self._reactor, threads, f, *args))

    def _stop_threads(self) -> None:
        if self._threads is not None:
            self._threads.stop()
            self._threads = None

    def close(self) -> Deferred[None]:
        """Close idle connections and stop the thread pool."""
        self._stop_threads()
        return self._pool.closeCachedConnections()

    def _url(self, key: str | None, params: dict[str, str] | None = None) -> str:
        url = f"{self.endpoint}/{self.bucket}"
        if key is not None:
            url += "/" + quote_key(self.prefix + key)
        if params:
            url += "?" + query_string(params)
        return url

    async def _send(
        self,
        method: str,
        key: str | None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        payload_sha256: str | None = None,
    ) -> IResponse:
        """Sign and send one request; the response once its headers are in."""
        url = self._url(key, params)
        if body is not None and payload_sha256 is None:
            payload_sha256 = _hash(body)
        signed = self._signer.sign(method, url, headers or {}, payload_sha256 or EMPTY_SHA256)
        raw = Headers({name.encode("latin-1"): [v.encode("latin-1")] for name, v in signed.items()})
        self.requests += 1
        producer = _BytesProducer(body) if body is not None else None
        return await self._agent.request(method.encode("ascii"), url.encode("ascii"), raw, producer)

    async def _error(self, response: IResponse) -> Exception:
        """The exception an error answer stands for (its small body read)."""
        s3_code = message = ""
        try:
            body = await read_body(response, SMALL_BODY)
            if body.strip():
                root = _xml(body)
                s3_code, message = _text(root, "Code"), _text(root, "Message")
        except (ET.ParseError, S3Error):
            pass
        if response.code >= 500:
            return S3Unavailable(f"S3 answered {response.code} {s3_code} {message}".strip())
        return S3Error(response.code, s3_code or str(response.code), message)

    def _guarded(
        self, what: str, key: str, work: Callable[[], Coroutine[Any, Any, T]]
    ) -> Deferred[T]:
        """``work()`` bounded by the deadline and counted by the breaker."""
        try:
            self.breaker.check()
        except S3Unavailable as e:
            return fail(e)
        d = Deferred.fromCoroutine(work())
        # Not Deferred.addTimeout: cancelling a connection attempt fails
        # with ConnectingCancelledError, which it does not turn into a
        # TimeoutError. Whatever a cancelled call fails with, the timer
        # says whether the deadline cancelled it or the caller did.
        expired = cancelled = False

        def cancel(_: Deferred[T]) -> None:
            nonlocal cancelled
            cancelled = True
            d.cancel()

        def expire() -> None:
            nonlocal expired
            expired = True
            d.cancel()

        timer = self._reactor.callLater(self.deadline, expire)

        def done(result: T | Failure) -> T | Failure:
            if timer.active():
                timer.cancel()
            if not isinstance(result, Failure):
                self.breaker.success()
                return result
            if cancelled and not expired:
                # The caller's cancel; an Agent reports one that came after
                # the request was sent as ResponseNeverReceived.
                self.breaker.release()
                return Failure(CancelledError(f"S3 {what} {key} cancelled"))
            if expired or result.check(*_UNAVAILABLE):
                self.breaker.failure()
                if expired:
                    reason = f"no answer within {self.deadline}s"
                else:
                    reason = str(result.value) or result.type.__name__  # type: ignore[union-attr]
                self.log.warn(
                    "S3 {what} {key} failed: {reason} (breaker {state})",
                    what=what,
                    key=key,
                    reason=reason,
                    state=self.breaker.state,
                )
                if result.check(S3Unavailable):
                    return result
                return Failure(S3Unavailable(f"S3 {what} {key}: {reason}"))
            if result.check(S3Error):
                self.breaker.success()  # it answered
                return result
            # Cancelled by the caller, or a bug: nothing learnt about S3.
            self.breaker.release()
            return result

        outer: Deferred[T] = Deferred(cancel)
        d.addBoth(done).chainDeferred(outer)
        return outer

    # -- objects ----------------------------------------------------------

    def head(self, key: str) -> Deferred[ObjectInfo | None]:
        """The object's size, ETag, type and metadata; None when it is absent."""

        async def work() -> ObjectInfo | None:
            response = await self._send("HEAD", key)
            if response.code == 404:
                return None
            if response.code != 200:
                raise await self._error(response)
            metadata = {}
            for name, values in response.headers.getAllRawHeaders():
                lname = name.decode("latin-1").lower()
                if lname.startswith("x-amz-meta-") and values:
                    metadata[lname[len("x-amz-meta-") :]] = values[0].decode("latin-1")
            return ObjectInfo(
                size=int(_header(response, b"content-length") or 0),
                etag=_header(response, b"etag").strip('"'),
                content_type=_header(response, b"content-type"),
                metadata=metadata,
                last_modified=_header(response, b"last-modified"),
            )

        return self._guarded("HEAD", key, work)

    def get(
        self, key: str, first: int | None = None, last: int | None = None
    ) -> Deferred[IResponse]:
        """The object's response (200, or 206 for a range) with its body unread.

        ``first``/``last`` are inclusive byte offsets (``last`` None: to the
        end). The deadline covers the headers only: the caller reads the
        body with ``deliverBody`` under its own idle bound. A missing
        object is ``S3Error(404)``; a range past the end ``S3Error(416)``."""
        headers = {"Accept-Encoding": "identity"}
        if first is not None:
            if first < 0 or (last is not None and last < first):
                raise ValueError(f"bad range {first}-{last}")
            headers["Range"] = f"bytes={first}-{'' if last is None else last}"
        elif last is not None:
            raise ValueError("last without first")

        async def work() -> IResponse:
            response = await self._send("GET", key, headers=headers)
            if response.code in (200, 206):
                return response
            raise await self._error(response)

        return self._guarded("GET", key, work)

    def get_bytes(self, key: str, limit: int) -> Deferred[bytes | None]:
        """A small object's bytes (at most ``limit``, else S3Error
        ``BodyTooLarge``); None when it is absent. The deadline covers the body."""

        async def work() -> bytes | None:
            response = await self._send("GET", key, headers={"Accept-Encoding": "identity"})
            if response.code == 404:
                await read_body(response, SMALL_BODY)
                return None
            if response.code != 200:
                raise await self._error(response)
            return await read_body(response, limit)

        return self._guarded("GET", key, work)

    def put_bytes(
        self,
        key: str,
        data: bytes,
        content_type: str,
        metadata: dict[str, str],
        if_none_match: bool = False,
    ) -> Deferred[bool]:
        """Store ``data`` at ``key``. With ``if_none_match``, only if no object
        is there (atomic on RGW and AWS): False when one was."""
        headers = {"Content-Type": content_type, **_meta_headers(metadata)}
        if if_none_match:
            headers["If-None-Match"] = "*"

        async def work() -> bool:
            response = await self._put(key, headers, data)
            if response.code == 412 and if_none_match:
                await read_body(response, SMALL_BODY)
                return False
            if response.code != 200:
                raise await self._error(response)
            await read_body(response, SMALL_BODY)
            return True

        return self._guarded("PUT", key, work)

    async def _put(
        self,
        key: str,
        headers: dict[str, str],
        data: bytes,
        params: dict[str, str] | None = None,
        payload_sha256: str | None = None,
    ) -> IResponse:
        if payload_sha256 is None and len(data) > INLINE_HASH:
            payload_sha256 = await self._run(_hash, data)
        return await self._send("PUT", key, params, headers, data, payload_sha256)

    def delete(self, key: str) -> Deferred[None]:
        """Remove the object; removing an absent one is no error."""

        async def work() -> None:
            response = await self._send("DELETE", key)
            if response.code not in (200, 204, 404):
                raise await self._error(response)
            await read_body(response, SMALL_BODY)

        return self._guarded("DELETE", key, work)

    @_deferred
    async def list(self, prefix: str, limit: int = 1000) -> list[tuple[str, int, str]]:
        """``(key, size, last_modified)`` of at most ``limit`` objects whose
        keys start with ``prefix`` (the client's prefix not included), in
        key order; each page is one bounded call."""
        found: list[tuple[str, int, str]] = []
        token: str | None = None
        for _ in range(MAX_PAGES):
            params = {
                "list-type": "2",
                "prefix": self.prefix + prefix,
                "max-keys": str(min(self.page_size, limit - len(found))),
            }
            if token:
                params["continuation-token"] = token
            root = await self._list_page(params)
            for item in root.findall("Contents"):
                key = _text(item, "Key")[len(self.prefix) :]
                found.append((key, int(_text(item, "Size") or 0), _text(item, "LastModified")))
            token = _text(root, "NextContinuationToken")
            if len(found) >= limit or _text(root, "IsTruncated") != "true" or not token:
                break
        return found[:limit]

    def _list_page(self, params: dict[str, str]) -> Deferred[ET.Element]:
        async def work() -> ET.Element:
            response = await self._send("GET", None, params)
            if response.code != 200:
                raise await self._error(response)
            return _xml(await read_body(response, SMALL_BODY * 8))

        return self._guarded("LIST", params.get("prefix", ""), work)

    def presign_get(self, key: str, expires: int) -> str:
        """A URL anyone can GET the object with for ``expires`` seconds (the
        server enforces the expiry)."""
        if not 1 <= expires <= 604800:
            raise ValueError("expires must be 1 s to 7 days")
        return self._signer.presign(self._url(key), expires)

    def ensure_bucket(self) -> Deferred[None]:
        """Create the bucket unless it exists (and is ours)."""

        async def work() -> None:
            response = await self._send("HEAD", None)
            if response.code == 200:
                return
            if response.code != 404:
                raise await self._error(response)
            error = await self._create_bucket(self._location())
            if isinstance(error, S3Error) and error.s3_code == "InvalidLocationConstraint":
                # RGW names its zonegroups, not AWS regions ("default").
                error = await self._create_bucket(b"")
            if error is None:
                return
            if isinstance(error, S3Error) and error.s3_code == "BucketAlreadyOwnedByYou":
                return
            raise error

        return self._guarded("CREATE", self.bucket, work)

    def _location(self) -> bytes:
        # AWS wants the region named unless it is us-east-1, where naming
        # it is an error.
        if self._region in ("", "us-east-1"):
            return b""
        return (
            "<CreateBucketConfiguration><LocationConstraint>"
            f"{escape(self._region)}</LocationConstraint></CreateBucketConfiguration>"
        ).encode()

    async def _create_bucket(self, body: bytes) -> Exception | None:
        response = await self._send("PUT", None, body=body)
        if response.code == 200:
            await read_body(response, SMALL_BODY)
            return None
        return await self._error(response)

    # -- multipart --------------------------------------------------------

    @_deferred
    async def upload_file(
        self,
        key: str,
        path: str,
        size: int,
        content_type: str,
        metadata: dict[str, str],
        part_size: int = 16 << 20,
    ) -> None:
        """Upload ``size`` bytes of the file at ``path``; the object appears
        only when all of it is in. A file smaller than one part is one PUT;
        a larger one a multipart upload, aborted if anything fails.

        Each request has the client's deadline, parts too: with 16 MiB
        parts and 10 s, S3 must take at least 1.6 MB/s. Parts are read and hashed
        in ``run``, the next one while the current one is sent. Each part
        carries its SHA-256 in the signature, so S3 refuses a part that
        was damaged on the way (``XAmzContentSHA256Mismatch``)."""
        headers = {"Content-Type": content_type, **_meta_headers(metadata)}
        if size < part_size:
            whole, whole_digest = await self._run(_read_part, path, 0, size)
            await self._guarded(
                "PUT", key, lambda: self._put_checked(key, headers, whole, whole_digest)
            )
            return
        if part_size < MIN_PART:
            raise ValueError(f"parts must be at least {MIN_PART} bytes")
        count = -(-size // part_size)
        if count > MAX_PARTS:
            raise ValueError(f"{size} bytes need more than {MAX_PARTS} parts of {part_size}")
        upload_id = await self._guarded("CREATE-UPLOAD", key, lambda: self._create(key, headers))
        next_part: Deferred[tuple[bytes, str]] | None = None
        try:
            etags: list[str] = []
            next_part = self._run(_read_part, path, 0, min(part_size, size))
            for number in range(1, count + 1):
                data, digest = await next_part
                offset = number * part_size
                if number < count:
                    next_part = self._run(_read_part, path, offset, min(part_size, size - offset))
                etag = await self._guarded(
                    "UPLOAD-PART",
                    key,
                    lambda n=number, b=data, h=digest: self._part(key, upload_id, n, b, h),  # type: ignore[misc]
                )
                etags.append(etag)
            await self._guarded("COMPLETE", key, lambda: self._complete(key, upload_id, etags))
        except (CancelledError, ConnectingCancelledError):
            if next_part is not None:
                next_part.addErrback(lambda _: None)  # a read still under way
            # The caller has gone: abort without holding it up.
            self._abort_quietly(key, upload_id)
            raise
        except BaseException:
            if next_part is not None:
                next_part.addErrback(lambda _: None)
            await self._abort_quietly(key, upload_id)
            raise
        self.log.info(
            "S3 uploaded {key} ({size} bytes, {count} parts)", key=key, size=size, count=count
        )

    async def _put_checked(
        self, key: str, headers: dict[str, str], data: bytes, digest: str
    ) -> None:
        response = await self._put(key, headers, data, payload_sha256=digest)
        if response.code != 200:
            raise await self._error(response)
        await read_body(response, SMALL_BODY)

    async def _create(self, key: str, headers: dict[str, str]) -> str:
        response = await self._send("POST", key, {"uploads": ""}, headers, b"")
        if response.code != 200:
            raise await self._error(response)
        upload_id = _text(_xml(await read_body(response, SMALL_BODY)), "UploadId")
        if not upload_id:
            raise S3Error(response.code, "NoUploadId", "CreateMultipartUpload gave no UploadId")
        return upload_id

    async def _part(self, key: str, upload_id: str, number: int, data: bytes, digest: str) -> str:
        params = {"partNumber": str(number), "uploadId": upload_id}
        response = await self._put(key, {}, data, params, digest)
        if response.code != 200:
            raise await self._error(response)
        await read_body(response, SMALL_BODY)
        etag = _header(response, b"etag")
        if not etag:
            raise S3Error(response.code, "NoETag", f"part {number} has no ETag")
        return etag

    async def _complete(self, key: str, upload_id: str, etags: builtins.list[str]) -> None:
        parts = "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{escape(etag)}</ETag></Part>"
            for n, etag in enumerate(etags, 1)
        )
        body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        headers = {"Content-Type": "application/xml"}
        response = await self._send("POST", key, {"uploadId": upload_id}, headers, body)
        if response.code != 200:
            raise await self._error(response)
        # S3 may answer 200 and put the error in the body.
        root = _xml(await read_body(response, SMALL_BODY))
        if root.tag == "Error":
            code, message = _text(root, "Code"), _text(root, "Message")
            if code in ("InternalError", "SlowDown", "ServiceUnavailable"):
                raise S3Unavailable(f"S3 complete failed: {code} {message}")
            raise S3Error(200, code, message)

    def _abort_quietly(self, key: str, upload_id: str) -> Deferred[None]:
        """Abort an upload, best effort: failures are logged (and
        ``abort_stale_uploads`` catches what is left)."""

        def failed(failure: Failure) -> None:
            self.log.warn(
                "S3 could not abort upload {upload_id} of {key}: {error}",
                upload_id=upload_id,
                key=key,
                error=failure.getErrorMessage(),
            )

        return self.abort_upload(key, upload_id).addErrback(failed)

    def abort_upload(self, key: str, upload_id: str) -> Deferred[None]:
        """Abort a multipart upload and free its parts (a gone one is fine)."""

        async def work() -> None:
            response = await self._send("DELETE", key, {"uploadId": upload_id})
            if response.code not in (200, 204, 404):
                raise await self._error(response)
            await read_body(response, SMALL_BODY)

        return self._guarded("ABORT", key, work)

    @_deferred
    async def list_uploads(self) -> builtins.list[tuple[str, str, str]]:
        """``(key, upload_id, initiated)`` of the unfinished multipart uploads
        under the client's prefix."""
        found: list[tuple[str, str, str]] = []
        markers: dict[str, str] = {}
        for _ in range(MAX_PAGES):
            params = {"uploads": "", "prefix": self.prefix, **markers}

            async def work(params: dict[str, str] = params) -> ET.Element:
                response = await self._send("GET", None, params)
                if response.code != 200:
                    raise await self._error(response)
                return _xml(await read_body(response, SMALL_BODY * 8))

            root = await self._guarded("LIST-UPLOADS", self.prefix, work)
            for upload in root.findall("Upload"):
                key = _text(upload, "Key")[len(self.prefix) :]
                found.append((key, _text(upload, "UploadId"), _text(upload, "Initiated")))
            markers = {
                "key-marker": _text(root, "NextKeyMarker"),
                "upload-id-marker": _text(root, "NextUploadIdMarker"),
            }
            if _text(root, "IsTruncated") != "true" or not markers["key-marker"]:
                break
        return found

    @_deferred
    async def abort_stale_uploads(self, older_than: float) -> int:
        """Abort the uploads started more than ``older_than`` seconds ago
        (by the reactor's clock); how many were aborted."""
        now = self._reactor.seconds()
        aborted = 0
        for key, upload_id, initiated in await self.list_uploads():
            try:
                started = parse_time(initiated)
            except ValueError:
                continue
            if now - started > older_than:
                await self.abort_upload(key, upload_id)
                aborted += 1
        if aborted:
            self.log.info("S3 aborted {count} stale uploads", count=aborted)
        return aborted
