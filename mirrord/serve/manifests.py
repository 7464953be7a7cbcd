"""Manifests: by digest local-first; by tag revalidated with a HEAD
(free on Docker Hub, shared by concurrent pulls, skipped within
``tag_ttl``), an unchanged digest served from the store, and the last known
digest served stale when the upstream chain fails."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from mirrord.expiring import Expiring
from mirrord.registry import errors
from mirrord.registry.respond import API_VERSION
from mirrord.serve.answer import copy_headers, note_cache, note_upstream, write_answer
from mirrord.serve.cached import OCTET_STREAM, CacheContext, accepts, drop
from mirrord.serve.memo import ManifestMemo
from mirrord.serve.privacy import credential_of
from mirrord.store.disk import TOUCH_EVERY, Entry, Meta, TagRecord, write_tag_file
from mirrord.store.worker import put_bytes
from mirrord.upstream.bodies import BodyTooLarge, read_small_body
from mirrord.upstream.chain import FAILOVER_CODES, Answer

log = Logger()

MAX_MANIFEST = 4 << 20


@dataclass
class Manifests(CacheContext):
    """The manifest path of one registry's cache."""

    def __post_init__(self) -> None:
        # Tags revalidated within tag_ttl: (repository, tag) -> its record.
        self._fresh: Expiring[tuple[str, str], TagRecord] = Expiring(self.clock.seconds)
        # HEADs of a tag on their way upstream, shared by whoever may see
        # their answer: (repository, tag, credential or "" when public).
        self._revalidating: dict[tuple[str, str, str], Deferred[Answer | None]] = {}
        # Recently served manifests' bytes, so a hit reads no file.
        self._memo = ManifestMemo()
        self._results: dict[str, Any] = {}

    def by_digest_now(
        self, request: Request, digest: str, path: str, headers: Callable[[], Headers]
    ) -> bool:
        """A manifest in the cache that this client may read, sent at once
        (``False``: ``by_digest`` decides). The client's ``headers()`` are
        built only for content that is not public."""
        cached = self._cached_manifest(digest)
        if cached is None:
            return False
        entry, body = cached
        if not (entry.meta.public or self.access.allowed_now(headers(), entry.meta, path)):
            return False
        self._send_manifest(request, digest, body, entry.meta.media_type, "HIT")
        return True

    def by_tag_now(
        self, request: Request, tag: str, name: str, headers: Callable[[], Headers]
    ) -> bool:
        """A tag revalidated within ``tag_ttl``, sent at once from the cache
        (``False``: ``by_tag`` decides)."""
        record = self._fresh.get((name, tag))
        if record is None:
            return False
        # A public record is served to anyone: no headers are looked at.
        client = Headers() if record.public else headers()
        return self._serve_recent(request, tag, name, client, record, "HIT")

    async def by_digest(
        self, request: Request, digest: str, name: str, path: str, headers: Headers
    ) -> None:
        cached = self._cached_manifest(digest) or await self._manifest_on_disk(digest)
        if cached is not None:
            entry, body = cached
            if await self._refused(request, entry.meta, headers, path):
                return
            self._send_manifest(request, digest, body, entry.meta.media_type, "HIT")
            return
        shared = await self._manifest_from_shared(digest)
        if shared is not None:
            entry, body = shared
            if await self._refused(request, entry.meta, headers, path):
                return
            self._send_manifest(request, digest, body, entry.meta.media_type, "SHARED")
            return
        if request.method == b"HEAD":
            await self._pass(request, path, headers)
            return
        await self._fetch_manifest(request, name, path, headers, expected=digest)

    async def _manifest_from_shared(self, digest: str) -> tuple[Entry, bytes] | None:
        """A manifest another host of the fleet stored, checked against its
        digest and kept on this host's disk too; None when the shared store
        has none or cannot say within its deadline."""
        if self.shared is None or not digest.startswith("sha256:"):
            return None
        try:
            found = await self.shared.get_small(digest)
        except CancelledError:
            raise
        except Exception as e:
            self.metrics.shared_errors.inc()
            log.warn("shared store read of {digest} failed: {e}", digest=digest, e=e)
            return None
        if found is None:
            return None
        body, meta = found
        if _digest_of(body) != digest:
            self.metrics.mismatches.inc()
            log.error("the shared store's {digest} does not match its digest", digest=digest)
            return None
        try:
            await put_bytes(self.store, self.hashers("sha256"), digest, body, meta)
        except OSError as e:
            log.warn("cannot cache manifest {digest}: {error}", digest=digest, error=str(e))
            return None
        return self._cached_manifest(digest)

    def _share(self, work: Any, what: str) -> None:
        """Write-through to the shared store: its failure costs the fleet a
        copy, never this pull."""

        def failed(failure: Failure) -> None:
            self.metrics.shared_errors.inc()
            log.warn("shared store: cannot {what}: {error}", what=what, error=failure.value)

        ensureDeferred(work).addErrback(failed)

    async def by_tag(
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
            if await self._serve_stale(request, tag, name, headers):
                drop(head, self.clock, self.timeouts.body_idle)
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
                drop(head, self.clock, self.timeouts.body_idle)
                await self._pass(request, path, headers)
            return
        self.access.remember(headers, name)
        digest = head.headers.getRawHeaders(b"docker-content-digest", [b""])[-1].decode("latin-1")
        cached = None
        if digest:
            cached = self._cached_manifest(digest) or await self._manifest_on_disk(digest)
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
            drop(head, self.clock, self.timeouts.body_idle)
            self._send_manifest(request, digest, body, entry.meta.media_type, "HIT", head)
            return
        if request.method == b"HEAD":
            note_cache(request, "MISS")
            await write_answer(request, head, self.realms, self.clock, self.timeouts)
            return
        drop(head, self.clock, self.timeouts.body_idle)
        await self._fetch_manifest(request, name, path, headers, tag=tag)

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
        counter = self._results.get(status)
        if counter is None:
            counter = self._results[status] = self.metrics.cache.labels(status)
        counter.inc()
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
        entry = self.store.entries.get(digest)
        if entry is not None:
            body = self._memo.get(digest, entry)
            now = self.store.now()
            # The store's own ``get`` (a stat, and the mtime touched once
            # an hour for the access order across restarts) when it is due.
            if body is not None and now - entry.last_access < TOUCH_EVERY:
                entry.last_access = now
                return entry, body
        entry = self.store.get(digest)
        if entry is None:
            return None
        body = self.store.read(digest)
        if body is None:
            return None
        self._memo.put(digest, entry, body)
        return entry, body

    async def _manifest_on_disk(self, digest: str) -> tuple[Entry, bytes] | None:
        """A manifest another process sharing the cache stored: indexed
        here from the disk worker's look (a miss only; hits never wait)."""
        found = await self.hashers("sha256").run(self.store.find, digest)
        if found is None:
            return None
        self.store.adopt(found)
        return self._cached_manifest(digest)

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
            media_type = _declared_media_type(body)
        self.access.remember(headers, name)
        if digest.startswith("sha256:"):
            public = await self._publicity(headers, name, path)
            try:
                meta = Meta(media_type, name, public, self.registry.name)
                await put_bytes(self.store, self.hashers("sha256"), digest, body, meta)
                self.store.evict()
                if self.shared is not None:
                    self._share(self.shared.put_small(digest, body, meta), f"store {digest}")
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
        job = self.tags.prepare(self.registry.name, name, tag, record)
        if job is None:
            return
        if self.shared is not None:
            self._share(
                self.shared.put_tag(self.registry.name, name, tag, record), f"record {name}:{tag}"
            )

        def failed(failure: Failure) -> None:
            log.warn(
                "cannot record tag {name}:{tag}: {error}",
                name=name,
                tag=tag,
                error=str(failure.value),
            )

        # The file (and its fsync) on the disk worker; the index has it now.
        self.hashers("sha256").run(write_tag_file, *job).addErrback(failed)

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

    async def _serve_stale(self, request: Request, tag: str, name: str, headers: Headers) -> bool:
        # The tag as any process sharing the cache last recorded it (read
        # on the disk worker: this is the outage path, not the hot one).
        record = await self.hashers("sha256").run(self.tags.read, self.registry.name, name, tag)
        if record is not None:
            self.tags.learn(self.registry.name, name, tag, record)
            if self._cached_manifest(record.digest) is None:
                await self._manifest_on_disk(record.digest)
        else:
            record = self.tags.get(self.registry.name, name, tag)
        if self.shared is not None:
            # Another host of the fleet may have seen the tag later.
            try:
                theirs = await self.shared.get_tag(self.registry.name, name, tag)
            except CancelledError:
                raise
            except Exception as e:
                self.metrics.shared_errors.inc()
                log.warn("shared store tag read failed: {e}", e=e)
                theirs = None
            if theirs is not None and (record is None or theirs.fetched > record.fetched):
                record = theirs
                self.tags.learn(self.registry.name, name, tag, record)
            if record is not None and self._cached_manifest(record.digest) is None:
                await self._manifest_from_shared(record.digest)
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
        if not accepts(request, record.media_type):
            return False
        cached = self._cached_manifest(record.digest)
        if cached is None:
            return False
        self._send_manifest(request, record.digest, cached[1], record.media_type, status)
        return True


def _digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


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
