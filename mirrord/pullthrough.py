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

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

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
from mirrord.expiring import Expiring
from mirrord.fill import Fill, FillFailed, stream_file
from mirrord.hashing import Hasher, InlineHasher
from mirrord.inflight import InFlight, Starting
from mirrord.metrics import Metrics
from mirrord.privacy import AccessChecks, credential_of
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
    # One table per store, shared by every registry: give each the same.
    in_flight: InFlight | None = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        # Tags revalidated within tag_ttl: (repository, tag) -> its record.
        self._fresh: Expiring[tuple[str, str], TagRecord] = Expiring(self.clock.seconds)
        # HEADs of a tag on their way upstream, shared by whoever may see
        # their answer: (repository, tag, credential or "" when public).
        self._revalidating: dict[tuple[str, str, str], Deferred[Answer | None]] = {}
        if self.in_flight is None:
            self.in_flight = InFlight(self._update_gauges)
        self._update_gauges()

    async def serve(
        self, request: Request, ref: Reference, name: str, path: str, headers: Headers
    ) -> None:
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
        note_cache(request, cache)
        await write_answer(request, answer, self.realms, self.clock, self.timeouts)

    async def _get_or_pass(self, request: Request, path: str, headers: Headers) -> Answer | None:
        """GET upstream: a 200 to cache is returned; anything else is passed
        to the client as it is (and ``None`` returned)."""
        answer = await self.chain.request(b"GET", path, headers)
        if answer.code == 200 and answer.body is None:
            return answer
        note_cache(request, "MISS")
        await write_answer(request, answer, self.realms, self.clock, self.timeouts)
        return None

    async def _publicity(self, headers: Headers, name: str, path: str) -> bool:
        if not headers.hasHeader(b"authorization"):
            return True  # the upstream served it to a client with no credentials
        return await self.access.is_public(name, path)

    def _update_gauges(self) -> None:
        self.metrics.update_cache(self.store)

    # -- /v2/ ---------------------------------------------------------------

    async def _base(self, request: Request, path: str, headers: Headers) -> None:
        try:
            answer: Answer | None = await self.chain.request(request.method, path, headers)
        except errors.RegistryError:
            answer = None
        if answer is not None and answer.code not in FAILOVER_CODES:
            await write_answer(request, answer, self.realms, self.clock, self.timeouts)
            return
        # Clients probe /v2/ before anything else: keep answering it so
        # cached content stays reachable while upstream is down.
        if answer is not None and answer.body is None:
            discard_body(answer.response)
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
        # Each turn looks at the store and the in-flight table afresh: a
        # start we waited for may have become a fill, a hit, or nothing.
        while True:
            entry = self.store.get(digest)
            if entry is not None:
                if await self._refused(request, entry.meta, headers, path):
                    return
                # Evicted while the privacy check waited: a miss after all.
                entry = self.store.get(digest)
                if entry is None:
                    continue
                await self._send_blob(
                    request, entry.digest, entry.size, entry.meta, "HIT", entry=entry
                )
                return
            current = self.in_flight.get(digest)
            if isinstance(current, Starting):
                await current.wait()
                continue
            if current is not None:
                fill = current
                if await self._refused(request, fill.meta, headers, path):
                    return
                if fill.error is None:
                    await self._send_blob(
                        request, digest, fill.expected_size, fill.meta, "COALESCED", fill=fill
                    )
                    return
                continue
            if request.method == b"HEAD" or request.getHeader(b"range") is not None:
                await self._pass(request, path, headers)
                return
            await self._lead_fill(request, digest, name, path, headers)
            return

    async def _refused(self, request: Request, meta: Meta, headers: Headers, path: str) -> bool:
        """Apply the privacy rule; a refused client gets the upstream's answer."""
        refusal = await self.access.check(headers, meta, path)
        if refusal is None:
            return False
        note_cache(request, "MISS")
        note_upstream(request, refusal)
        copy_headers(request, refusal, self.realms)
        kind = "MANIFEST_UNKNOWN" if "/manifests/" in path else "BLOB_UNKNOWN"
        code = {401: "UNAUTHORIZED", 403: "DENIED", 404: kind, 429: "TOOMANYREQUESTS"}.get(
            refusal.code, "UNKNOWN"
        )
        body = errors.error_body(code, f"upstream answered {refusal.code}")
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        if request.method != b"HEAD":
            request.write(body)
        request.finish()
        return True

    async def _lead_fill(
        self, request: Request, digest: str, name: str, path: str, headers: Headers
    ) -> None:
        """Start the one upstream fetch of ``digest`` and follow it. The
        start belongs to the in-flight table: leaving does not cancel it."""
        work = ensureDeferred(self._start_fill(digest, name, path, headers))
        starting = self.in_flight.start(digest, work, _fill_in, _drop_outcome)
        outcome = await starting.lead()
        if isinstance(outcome, Answer):
            note_cache(request, "MISS")
            await write_answer(request, outcome, self.realms, self.clock, self.timeouts)
            return
        fill, answer = outcome
        note_upstream(request, answer)
        await self._send_blob(request, digest, fill.expected_size, fill.meta, "MISS", fill=fill)

    async def _start_fill(
        self, digest: str, name: str, path: str, headers: Headers
    ) -> tuple[Fill, Answer] | Answer:
        """GET upstream; a 200 becomes a running ``Fill``, anything else is
        the leader's answer."""
        answer = await self.chain.request(b"GET", path, headers)
        if answer.code != 200 or answer.body is not None:
            return answer
        length = answer.response.length
        content_type = answer.headers.getRawHeaders(b"content-type", [OCTET_STREAM.encode()])[-1]
        meta = Meta(
            content_type.decode("latin-1"),
            name,
            not headers.hasHeader(b"authorization"),
            self.registry.name,
        )
        try:
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
        except OSError as e:
            # A full disk or no free descriptor: the client still gets the
            # blob, passed through; nothing is cached.
            log.warn("not caching {digest}: {error}", digest=digest, error=str(e))
            return answer
        answer.response.deliverBody(fill)
        # Bounded even if nobody ever reads it (the leader may have gone).
        fill.add_reader()
        fill.remove_reader()
        self.access.remember(headers, name)
        if not meta.public:
            ensureDeferred(self._settle_publicity(fill, name, path)).addErrback(
                lambda f: log.failure("publicity check failed", f)
            )
        return fill, answer

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
        try:
            await stream_file(request, path, offset, length, following)
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
        if cached is not None:
            entry, body = cached
            if await self._refused(request, entry.meta, headers, path):
                return
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
            body = await read_small_body(answer.response, MAX_MANIFEST)
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
            media_type = _declared_media_type(body)
        self.access.remember(headers, name)
        if digest.startswith("sha256:"):
            public = await self._publicity(headers, name, path)
            try:
                self.store.put_bytes(
                    digest, body, Meta(media_type, name, public, self.registry.name)
                )
                self.store.evict()
            except OSError as e:
                # The client still gets the manifest; only the cache misses out.
                log.warn("cannot cache manifest {digest}: {error}", digest=digest, error=str(e))
            self._update_gauges()
            if tag is not None:
                self._record_tag(
                    name,
                    tag,
                    TagRecord(digest, media_type, len(body), self.clock.seconds(), public),
                )
        self._send_manifest(request, digest, body, media_type, "MISS", answer)

    def _record_tag(self, name: str, tag: str, record: TagRecord) -> None:
        """Remember a tag's digest: for ``tag_ttl`` in memory, on disk for
        stale serving (failing to write is no reason to fail the pull)."""
        if self.config.tag_ttl > 0:
            self._fresh.put((name, tag), record, self.config.tag_ttl)
        try:
            self.tags.put(self.registry.name, name, tag, record)
        except OSError as e:
            log.warn("cannot record tag {name}:{tag}: {error}", name=name, tag=tag, error=str(e))

    async def _manifest_by_tag(
        self, request: Request, tag: str, name: str, path: str, headers: Headers
    ) -> None:
        if self._serve_recent(request, tag, name, headers, self._fresh.get((name, tag)), "HIT"):
            return
        failure: errors.RegistryError | None = None
        head: Answer | None = None
        try:
            head = await self._head_tag(tag, name, path, headers)
        except CancelledError:
            raise
        except errors.RegistryError as e:
            failure = e
        if head is None or head.code in FAILOVER_CODES:
            if self._serve_stale(request, tag, name, headers):
                _drop(head)
                return
            if failure is not None:
                raise failure
            assert head is not None
        if head.code != 200:
            if request.method == b"HEAD":
                note_cache(request, "MISS")
                await write_answer(request, head, self.realms, self.clock, self.timeouts)
            else:
                # The client wants the error's body, which a HEAD lacks.
                _drop(head)
                await self._pass(request, path, headers)
            return
        self.access.remember(headers, name)
        digest = head.headers.getRawHeaders(b"docker-content-digest", [b""])[-1].decode("latin-1")
        cached = self._cached_manifest(digest) if digest else None
        if cached is not None:
            entry, body = cached
            self._record_tag(
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
            _drop(head)
            self._send_manifest(request, digest, body, entry.meta.media_type, "HIT", head)
            return
        if request.method == b"HEAD":
            note_cache(request, "MISS")
            await write_answer(request, head, self.realms, self.clock, self.timeouts)
            return
        _drop(head)
        await self._fetch_manifest(request, name, path, headers, tag=tag)

    async def _head_tag(self, tag: str, name: str, path: str, headers: Headers) -> Answer:
        """HEAD a tag upstream, sharing one HEAD between concurrent pulls
        that may all see its answer: the same credentials, or anyone when
        the tag is known to be public. Only a 200 is shared."""
        known = self.tags.get(self.registry.name, name, tag)
        key = (name, tag, "" if known is not None and known.public else credential_of(headers))
        pending = self._revalidating.get(key)
        if pending is not None:
            shared = await _follow(pending)
            if shared is not None:
                return dataclasses.replace(shared, body=b"")  # its body is the leader's
        mine: Deferred[Answer | None] = Deferred()
        self._revalidating[key] = mine
        try:
            head = await self.chain.request(b"HEAD", path, headers)
        except BaseException:
            mine.callback(None)
            raise
        finally:
            if self._revalidating.get(key) is mine:
                del self._revalidating[key]
        mine.callback(head if head.code == 200 else None)
        return head

    def _serve_stale(self, request: Request, tag: str, name: str, headers: Headers) -> bool:
        record = self.tags.get(self.registry.name, name, tag)
        if record is None or self.clock.seconds() - record.fetched > self.config.stale_max_age:
            return False
        return self._serve_recent(request, tag, name, headers, record, "STALE")

    def _serve_recent(
        self,
        request: Request,
        tag: str,
        name: str,
        headers: Headers,
        record: TagRecord | None,
        status: str,
    ) -> bool:
        """Serve a tag from what the cache last learned of it, if this
        client may see it and takes its media type."""
        if record is None:
            return False
        if not (record.public or self.access.verified(headers, name)):
            return False
        if not _accepts(request, record.media_type):
            return False
        cached = self._cached_manifest(record.digest)
        if cached is None:
            return False
        self._send_manifest(request, record.digest, cached[1], record.media_type, status)
        return True


def _declared_media_type(body: bytes) -> str:
    """A manifest sent without a Content-Type: its own ``mediaType``, if it is one."""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise errors.RegistryError(
            502, "MANIFEST_INVALID", "upstream sent a manifest that is not a JSON object"
        )
    media_type = document.get("mediaType")
    return media_type if isinstance(media_type, str) and media_type else OCTET_STREAM


def _follow(pending: Deferred[Answer | None]) -> Deferred[Answer | None]:
    """Wait for a shared HEAD without letting our cancellation cancel it."""
    mine: Deferred[Answer | None] = Deferred()

    def relay(result: Answer | None) -> Answer | None:
        if not mine.called:
            mine.callback(result)
        return result

    pending.addCallback(relay)
    return mine


def _drop(answer: Answer | None) -> None:
    """Let go of an answer we will not pass on."""
    if answer is not None and answer.body is None:
        discard_body(answer.response)


def _fill_in(outcome: tuple[Fill, Answer] | Answer) -> Fill | None:
    return None if isinstance(outcome, Answer) else outcome[0]


def _drop_outcome(outcome: tuple[Fill, Answer] | Answer) -> None:
    """The leader left before the upstream answered: nobody reads an
    answer that did not become a fill."""
    if isinstance(outcome, Answer):
        _drop(outcome)
