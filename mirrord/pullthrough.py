"""The pull-through cache in the request path: what is immutable is served
local-first, what is mutable is revalidated remote-first.

- Blobs and manifests by digest: from the store when present (and the
  client may see them, see ``privacy``); otherwise fetched once, with every
  concurrent client of the same digest following that one fill.
- Manifests by tag: revalidated with a HEAD (free on Docker Hub); an
  unchanged digest is served from the store, saving the rate-limited GET.
  When the upstream chain fails (429, 5xx, timeout, unreachable) the last
  known digest is served stale, within ``stale_max_age``.
- ``/v2/`` is answered locally when no upstream can answer it, so clients'
  first probe still works during an outage.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.server import Request

from mirrord import errors
from mirrord.answer import copy_headers, note_cache, note_upstream, write_answer
from mirrord.auth import RealmBook
from mirrord.cache import BlobStore, Entry, Meta, TagRecord, TagStore
from mirrord.config import CacheConfig, Registry, Timeouts
from mirrord.fill import Fill, FillFailed, stream_file
from mirrord.hashing import Hasher, InlineHasher
from mirrord.metrics import Metrics
from mirrord.privacy import AccessChecks
from mirrord.reference import Kind, Reference
from mirrord.respond import API_VERSION, write_error
from mirrord.streaming import BodyTooLarge, abort_client, discard_body, read_small_body
from mirrord.upstream import FAILOVER_CODES, Answer, UpstreamChain

log = Logger()

MAX_MANIFEST = 4 << 20
OCTET_STREAM = "application/octet-stream"


def _digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _byte_range(value: bytes | None, size: int) -> tuple[int, int] | None:
    """(first, last) of a ``bytes=`` range already checked for syntax."""
    if value is None:
        return None
    first, _, last = value.strip()[6:].decode().partition("-")
    if not first:
        return max(0, size - int(last)), size - 1
    return int(first), min(int(last), size - 1) if last else size - 1


def _accepts(request: Request, media_type: str) -> bool:
    values = request.requestHeaders.getRawHeaders(b"accept")
    if not values:
        return True
    offered = {
        v.split(b";")[0].strip().decode("latin-1") for raw in values for v in raw.split(b",")
    }
    return media_type in offered or "*/*" in offered


@dataclass
class PullThrough:
    """Serves blobs and manifests through the store."""

    registry: Registry
    chain: UpstreamChain
    store: BlobStore
    tags: TagStore
    access: AccessChecks
    realms: RealmBook
    clock: IReactorTime
    timeouts: Timeouts
    config: CacheConfig
    metrics: Metrics
    hashers: Callable[[str], Hasher] = InlineHasher

    def __post_init__(self) -> None:
        self._fills: dict[str, Fill | Deferred[Fill | None]] = {}
        self._update_gauges()

    async def serve(
        self, request: Request, ref: Reference, name: str, path: str, headers: Headers
    ) -> None:
        self.metrics.requests.labels(ref.kind.value).inc()
        if ref.kind is Kind.BLOB:
            await self._blob(request, ref.reference, name, path, headers)
        elif ref.kind is Kind.MANIFEST and ref.by_digest:
            await self._manifest_by_digest(request, ref.reference, name, path, headers)
        elif ref.kind is Kind.MANIFEST:
            await self._manifest_by_tag(request, ref.reference, name, path, headers)
        elif ref.kind is Kind.BASE:
            await self._base(request, path, headers)
        else:
            await self._pass(request, path, headers)

    # -- pieces -----------------------------------------------------------

    async def _pass(
        self, request: Request, path: str, headers: Headers, cache: str = "MISS"
    ) -> None:
        answer = await self.chain.request(request.method, path, headers)
        self._count_answer(answer)
        note_cache(request, cache)
        await write_answer(request, answer, self.realms, self.clock, self.timeouts)

    async def _get_or_pass(self, request: Request, path: str, headers: Headers) -> Answer | None:
        """GET upstream: a 200 to cache is returned; anything else is passed
        to the client as it is (and ``None`` returned)."""
        answer = await self.chain.request(b"GET", path, headers)
        self._count_answer(answer)
        if answer.code == 200 and answer.body is None:
            return answer
        note_cache(request, "MISS")
        await write_answer(request, answer, self.realms, self.clock, self.timeouts)
        return None

    def _count_answer(self, answer: Answer) -> None:
        self.metrics.saw_upstream_headers(answer.upstream, answer.headers)
        if answer.fell_back:
            self.metrics.fallbacks.inc()

    async def _allowed(self, entry_public: bool, headers: Headers, name: str, path: str) -> bool:
        return await self.access.allowed(headers, name, entry_public, path)

    async def _publicity(self, headers: Headers, name: str, path: str) -> bool:
        if not headers.hasHeader(b"authorization"):
            return True  # the upstream served it to a client with no credentials
        return await self.access.is_public(name, path)

    def _update_gauges(self) -> None:
        self.metrics.cache_size.set(self.store.size)
        self.metrics.cache_entries.set(len(self.store.entries))

    # -- /v2/ ---------------------------------------------------------------

    async def _base(self, request: Request, path: str, headers: Headers) -> None:
        try:
            answer: Answer | None = await self.chain.request(request.method, path, headers)
        except errors.RegistryError:
            answer = None
        if answer is not None and answer.code not in FAILOVER_CODES:
            self._count_answer(answer)
            await write_answer(request, answer, self.realms, self.clock, self.timeouts)
            return
        # Clients probe /v2/ before anything else: keep answering it so
        # cached content stays reachable while upstream is down.
        if answer is not None and answer.body is None:
            discard_body(answer.response, self.clock, self.timeouts.body_idle)
        note_cache(request, "STALE")
        request.setHeader(*API_VERSION)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", b"2")
        request.write(b"{}")
        request.finish()

    # -- blobs --------------------------------------------------------------

    async def _blob(
        self, request: Request, digest: str, name: str, path: str, headers: Headers
    ) -> None:
        entry = self.store.get(digest)
        if entry is not None and await self._allowed(entry.meta.public, headers, name, path):
            await self._send_blob(request, entry.digest, entry.size, entry.meta, "HIT", entry=entry)
            return
        pending = self._fills.get(digest)
        if pending is not None:
            fill = await _shared(pending)
            if (
                fill is not None
                and fill.error is None
                and await self._allowed(fill.meta.public, headers, name, path)
            ):
                await self._send_blob(
                    request, digest, fill.expected_size, fill.meta, "COALESCED", fill=fill
                )
                return
        if request.method == b"HEAD" or request.getHeader(b"range") is not None:
            await self._pass(request, path, headers)
            return
        await self._fill_blob(request, digest, name, path, headers)

    async def _fill_blob(
        self, request: Request, digest: str, name: str, path: str, headers: Headers
    ) -> None:
        waiting: Deferred[Fill | None] = Deferred()
        self._fills[digest] = waiting
        fill: Fill | None = None
        try:
            answer = await self._get_or_pass(request, path, headers)
            if answer is None:
                return
            length = answer.response.length
            content_type = answer.headers.getRawHeaders(b"content-type", [OCTET_STREAM.encode()])[
                -1
            ]
            meta = Meta(
                content_type.decode("latin-1"), name, not headers.hasHeader(b"authorization")
            )
            fill = Fill(
                self.store,
                self.hashers(digest.split(":", 1)[0]),
                digest,
                meta,
                None if length is UNKNOWN_LENGTH else length,
                self.clock,
                self.timeouts.body_idle,
                self.config.fill_timeout,
                on_mismatch=lambda _: self.metrics.mismatches.inc(),
            )
            self._fills[digest] = fill
            fill.done.addBoth(self._fill_ended, digest, fill)
            answer.response.deliverBody(fill)
            self.access.remember(headers, name)
            if not meta.public:
                ensureDeferred(self._settle_publicity(fill, name, path)).addErrback(
                    lambda f: log.failure("publicity check failed", f)
                )
        finally:
            if self._fills.get(digest) is waiting:
                del self._fills[digest]
            waiting.callback(fill)
        note_upstream(request, answer)
        await self._send_blob(request, digest, fill.expected_size, meta, "MISS", fill=fill)

    def _fill_ended(self, result: Any, digest: str, fill: Fill) -> Any:
        if self._fills.get(digest) is fill:
            del self._fills[digest]
        self._update_gauges()
        return result

    async def _settle_publicity(self, fill: Fill, name: str, path: str) -> None:
        # Before publication the meta is written with the blob; after, update it.
        fill.meta.public = await self.access.is_public(name, path)
        if fill.entry is not None:
            self.store.update_meta(fill.digest, fill.meta)

    async def _send_blob(
        self,
        request: Request,
        digest: str,
        size: int | None,
        meta: Meta,
        status: str,
        entry: Entry | None = None,
        fill: Fill | None = None,
    ) -> None:
        self.metrics.cache.labels(status).inc()
        note_cache(request, status)
        request.setHeader(*API_VERSION)
        request.setHeader(b"Docker-Content-Digest", digest.encode())
        request.setHeader(b"ETag", f'"{digest}"'.encode())
        request.setHeader(b"Content-Type", meta.media_type.encode())
        request.setHeader(b"Accept-Ranges", b"bytes")
        offset, length = 0, size
        if size is not None:
            span = _byte_range(request.getHeader(b"range"), size)
            if span is not None:
                first, last = span
                if first >= size:
                    request.setHeader(b"Content-Range", f"bytes */{size}".encode())
                    write_error(request, errors.range_invalid(request.getHeader(b"range") or ""))
                    return
                request.setResponseCode(206)
                request.setHeader(b"Content-Range", f"bytes {first}-{last}/{size}".encode())
                offset, length = first, last - first + 1
            request.setHeader(b"Content-Length", b"%d" % length)
        if request.method == b"HEAD":
            request.finish()
            return
        if fill is not None and fill.error is not None:
            abort_client(request)
            return
        following = fill if fill is not None and fill.entry is None else None
        path = following.temp.path if following is not None else self.store.data_path(digest)
        if entry is not None:
            entry.readers += 1
        source = "upstream" if status == "MISS" else "cache"
        try:
            sent = await stream_file(
                request, path, offset, length, following, self.clock, self.timeouts.client_idle
            )
            self.metrics.bytes_served.labels(source).inc(sent)
        except FillFailed as e:
            record = getattr(request, "access", None)
            if record is not None:
                record.outcome = f"incomplete: {e}"
        finally:
            if entry is not None:
                entry.readers -= 1

    # -- manifests ----------------------------------------------------------

    def _send_manifest(
        self,
        request: Request,
        digest: str,
        body: bytes,
        media_type: str,
        status: str,
        upstream: Answer | None = None,
    ) -> None:
        if upstream is not None:
            # Keep what the upstream said about itself (rate-limit headers).
            note_upstream(request, upstream)
            copy_headers(request, upstream, self.realms)
            request.setResponseCode(200)
        self.metrics.cache.labels(status).inc()
        note_cache(request, status)
        request.setHeader(*API_VERSION)
        request.setHeader(b"Docker-Content-Digest", digest.encode())
        request.setHeader(b"ETag", f'"{digest}"'.encode())
        request.setHeader(b"Content-Type", media_type.encode())
        request.setHeader(b"Content-Length", b"%d" % len(body))
        if status == "STALE":
            request.setHeader(b"Warning", b'110 mirrord "Response is Stale"')
        if request.method != b"HEAD":
            self.metrics.bytes_served.labels("upstream" if status == "MISS" else "cache").inc(
                len(body)
            )
            request.write(body)
        request.finish()

    def _cached_manifest(self, digest: str) -> tuple[Entry, bytes] | None:
        entry = self.store.get(digest)
        if entry is None:
            return None
        body = self.store.read(digest)
        return (entry, body) if body is not None else None

    async def _manifest_by_digest(
        self, request: Request, digest: str, name: str, path: str, headers: Headers
    ) -> None:
        cached = self._cached_manifest(digest)
        if cached is not None and await self._allowed(cached[0].meta.public, headers, name, path):
            entry, body = cached
            self._send_manifest(request, digest, body, entry.meta.media_type, "HIT")
            return
        if request.method == b"HEAD":
            await self._pass(request, path, headers)
            return
        await self._fetch_manifest(request, name, path, headers, expected=digest)

    async def _fetch_manifest(
        self,
        request: Request,
        name: str,
        path: str,
        headers: Headers,
        expected: str | None = None,
        tag: str | None = None,
    ) -> None:
        """GET a manifest upstream, verify it, store it, send it."""
        answer = await self._get_or_pass(request, path, headers)
        if answer is None:
            return
        note_upstream(request, answer)
        try:
            body = await read_small_body(
                answer.response, self.clock, self.timeouts.body_idle, MAX_MANIFEST
            )
        except BodyTooLarge:
            raise errors.bad_gateway(
                f"upstream manifest larger than {MAX_MANIFEST} bytes"
            ) from None
        announced = answer.headers.getRawHeaders(b"docker-content-digest", [b""])[-1].decode(
            "latin-1"
        )
        digest = expected or announced or _digest_of(body)
        if digest.startswith("sha256:") and _digest_of(body) != digest:
            self.metrics.mismatches.inc()
            raise errors.RegistryError(
                502, "DIGEST_INVALID", f"upstream sent a manifest that does not match {digest}"
            )
        media_type = answer.headers.getRawHeaders(b"content-type", [b""])[-1].decode("latin-1")
        if not media_type:
            media_type = json.loads(body).get("mediaType", OCTET_STREAM)
        self.access.remember(headers, name)
        if digest.startswith("sha256:"):
            public = await self._publicity(headers, name, path)
            self.store.put_bytes(digest, body, Meta(media_type, name, public))
            self.store.evict()
            self._update_gauges()
            if tag is not None:
                self.tags.put(
                    self.registry.name,
                    name,
                    tag,
                    TagRecord(digest, media_type, len(body), self.clock.seconds(), public),
                )
        self._send_manifest(request, digest, body, media_type, "MISS", answer)

    async def _manifest_by_tag(
        self, request: Request, tag: str, name: str, path: str, headers: Headers
    ) -> None:
        failure: errors.RegistryError | None = None
        head: Answer | None = None
        try:
            head = await self.chain.request(b"HEAD", path, headers)
        except CancelledError:
            raise
        except errors.RegistryError as e:
            failure = e
        if head is None or head.code in FAILOVER_CODES:
            if self._serve_stale(request, tag, name, headers):
                _drop(head, self.clock, self.timeouts.body_idle)
                return
            if failure is not None:
                raise failure
            assert head is not None
        else:
            self._count_answer(head)
        if head.code != 200:
            if request.method == b"HEAD":
                note_cache(request, "MISS")
                await write_answer(request, head, self.realms, self.clock, self.timeouts)
            else:
                # The client wants the error's body, which a HEAD lacks.
                _drop(head, self.clock, self.timeouts.body_idle)
                await self._pass(request, path, headers)
            return
        self.access.remember(headers, name)
        digest = head.headers.getRawHeaders(b"docker-content-digest", [b""])[-1].decode("latin-1")
        cached = self._cached_manifest(digest) if digest else None
        if cached is not None:
            entry, body = cached
            self.tags.put(
                self.registry.name,
                name,
                tag,
                TagRecord(
                    digest,
                    entry.meta.media_type,
                    entry.size,
                    self.clock.seconds(),
                    entry.meta.public,
                ),
            )
            _drop(head, self.clock, self.timeouts.body_idle)
            self._send_manifest(request, digest, body, entry.meta.media_type, "HIT", head)
            return
        if request.method == b"HEAD":
            note_cache(request, "MISS")
            await write_answer(request, head, self.realms, self.clock, self.timeouts)
            return
        _drop(head, self.clock, self.timeouts.body_idle)
        await self._fetch_manifest(request, name, path, headers, tag=tag)

    def _serve_stale(self, request: Request, tag: str, name: str, headers: Headers) -> bool:
        record = self.tags.get(self.registry.name, name, tag)
        if record is None or self.clock.seconds() - record.fetched > self.config.stale_max_age:
            return False
        if not (record.public or self.access.verified(headers, name)):
            return False
        if not _accepts(request, record.media_type):
            return False
        cached = self._cached_manifest(record.digest)
        if cached is None:
            return False
        self._send_manifest(request, record.digest, cached[1], record.media_type, "STALE")
        return True


def _drop(answer: Answer | None, clock: IReactorTime, idle: float) -> None:
    """Let go of an answer we will not pass on."""
    if answer is not None and answer.body is None:
        discard_body(answer.response, clock, idle)


def _shared(pending: Fill | Deferred[Fill | None]) -> Deferred[Fill | None]:
    """Wait for a fill to start without letting our cancellation cancel it."""
    if isinstance(pending, Fill):
        return Deferred.fromCoroutine(_ready(pending))
    mine: Deferred[Fill | None] = Deferred()

    def relay(result: Fill | None) -> Fill | None:
        if not mine.called:
            mine.callback(result)
        return result

    pending.addCallback(relay)
    return mine


async def _ready(fill: Fill) -> Fill:
    return fill
