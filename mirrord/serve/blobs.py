"""Blobs by digest: from the store when present and the client may see
them; otherwise fetched once per daemon (``mirrord.store.inflight``), with
every client of the digest, the first included, following that one fill
from disk (``mirrord.store.fill``). Across processes sharing the cache,
the fill's lock (``mirrord.store.shared``) makes it once per host: a
process that finds it held follows the other's file (``mirrord.store.follow``)."""

from __future__ import annotations

import dataclasses
import json
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import Request

from mirrord.fleet.coordinator import Elsewhere, Owned
from mirrord.fleet.peer import PeerUnavailable
from mirrord.registry import errors
from mirrord.registry.respond import API_VERSION, abort_client, write_error
from mirrord.serve.answer import note_cache, note_upstream, write_answer
from mirrord.serve.cached import OCTET_STREAM, CacheContext, drop
from mirrord.store.disk import Entry, Meta
from mirrord.store.fill import Fill, FillFailed, Resume, StoreFailed, stream_file
from mirrord.store.follow import RemoteFill
from mirrord.store.inflight import Starting
from mirrord.store.shared import Claim, Published
from mirrord.upstream.bodies import discard_body, relay_body
from mirrord.upstream.chain import Answer

log = Logger()


@dataclass
class Blobs(CacheContext):
    """The blob path of one registry's cache."""

    async def serve(
        self, request: Request, digest: str, name: str, path: str, headers: Headers
    ) -> None:
        # Each turn looks at the store and the in-flight table afresh: a
        # start we waited for may have become a fill, a hit, or nothing; a
        # blob evicted before it could be opened is a miss.
        vanished = 0
        while True:
            try:
                await self._serve_once(request, digest, name, path, headers)
                return
            except _Vanished:
                vanished += 1
                if vanished > 2:
                    raise errors.RegistryError(
                        503, "UNAVAILABLE", "the cache is too small to hold this blob"
                    ) from None

    async def _serve_once(
        self, request: Request, digest: str, name: str, path: str, headers: Headers
    ) -> None:
        looked = False
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
                    request,
                    entry.digest,
                    entry.size,
                    entry.meta,
                    "HIT",
                    entry=entry,
                    upstream=(path, headers),
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
                        request,
                        digest,
                        fill.expected_size,
                        fill.meta,
                        "COALESCED",
                        fill=fill,
                        upstream=(path, headers),
                    )
                    return
                continue
            if not looked:
                # Another process sharing the cache may have it: one look on
                # the disk worker (never on the reactor), then the table again.
                looked = True
                await self._adopt_from_disk(digest)
                continue
            if self.shared is not None and (request.method == b"HEAD" or self.redirect):
                if await self._answer_from_shared(request, digest, path, headers):
                    return
            if request.method == b"HEAD" or request.getHeader(b"range") is not None:
                await self._pass(request, path, headers)
                return
            if await self._lead_fill(request, digest, name, path, headers):
                continue
            return

    async def _adopt_from_disk(self, digest: str) -> bool:
        """Index a blob another process published; whether there was one."""
        found = await self.hashers("sha256").run(self.store.find, digest)
        if found is None:
            return False
        self.store.adopt(found)
        return True

    async def _lead_fill(
        self, request: Request, digest: str, name: str, path: str, headers: Headers
    ) -> bool:
        """Start the one upstream fetch of ``digest`` and follow it. The
        start belongs to the in-flight table: leaving does not cancel it.
        True when the blob turned out to be published already: look again."""
        work = ensureDeferred(self._start_fill(digest, name, path, headers))
        starting = self.in_flight.start(
            digest,
            work,
            _fill_in,
            lambda outcome: _drop_outcome(outcome, self.clock, self.timeouts.body_idle),
        )
        outcome = await starting.lead()
        if outcome is _PUBLISHED:
            return True
        if isinstance(outcome, Answer):
            note_cache(request, "MISS")
            await write_answer(request, outcome, self.realms, self.clock, self.timeouts)
            return False
        if isinstance(outcome, Sourced):
            if not await self._refused(request, outcome.fill.meta, headers, path):
                await self._send_blob(
                    request,
                    digest,
                    outcome.fill.expected_size,
                    outcome.fill.meta,
                    outcome.status,
                    fill=outcome.fill,
                    upstream=(path, headers),
                )
            return False
        if isinstance(outcome, RemoteFill):
            if not await self._refused(request, outcome.meta, headers, path):
                await self._send_blob(
                    request,
                    digest,
                    outcome.expected_size,
                    outcome.meta,
                    "COALESCED",
                    fill=outcome,
                    upstream=(path, headers),
                )
            return False
        fill, answer = outcome
        note_upstream(request, answer)
        await self._send_blob(
            request,
            digest,
            fill.expected_size,
            fill.meta,
            "MISS",
            fill=fill,
            upstream=(path, headers),
        )
        return False

    async def _claim(self, digest: str) -> Claim | RemoteFill | object:
        """This process's right to fill ``digest`` (its lock), or another
        process's fill to follow, or ``_PUBLISHED``. A filler that goes
        before saying what it fetched leaves the lock to the next try."""
        run = self.hashers(digest.split(":", 1)[0]).run
        for _ in range(CLAIM_TRIES):
            try:
                claim = await run(self.store.claim, digest)
            except Published:
                found = await run(self.store.find, digest)
                if found is None:
                    continue  # evicted at once: claim again
                self.store.adopt(found)
                return _PUBLISHED
            if claim.locked:
                return claim
            follower = RemoteFill(
                self.store,
                claim,
                digest,
                run,
                self.clock,
                max(self.timeouts.response, self.timeouts.body_idle)
                * (self.config.resume_attempts + 2),
                self.config.fill_timeout,
            )
            try:
                return await follower.start()
            except FillFailed:
                if follower.verified:
                    return _PUBLISHED
                continue
        raise errors.RegistryError(503, "UNAVAILABLE", "the blob's fill keeps failing")

    async def _start_fill(
        self, digest: str, name: str, path: str, headers: Headers
    ) -> tuple[Fill, Answer] | Answer | RemoteFill | object:
        """GET upstream; a 200 becomes a running ``Fill``, anything else is
        the leader's answer. Another process filling it is followed instead."""
        try:
            claim = await self._claim(digest)
        except OSError as e:
            # The shared lock cannot be taken (a read-only disk...): fill
            # without it, as one process would.
            log.warn("no fill lock for {digest}: {error}", digest=digest, error=str(e))
            claim = None
        if not isinstance(claim, Claim | None):
            return claim
        owned: Owned | None = None
        if self.shared is not None or self.fleet is not None:
            try:
                sourced = await self._shared_fill(digest, path, headers, claim)
            except BaseException:
                self._let_go(claim)
                raise
            if isinstance(sourced, Sourced):
                return sourced
            owned = sourced
        return await self._fetch_fill(digest, name, path, headers, claim, owned)

    async def _shared_fill(
        self, digest: str, path: str, headers: Headers, claim: Claim | None
    ) -> Sourced | Owned | None:
        """A fill from the fleet instead of the upstream: from the shared
        store when it has the blob, else from the member whose lease says
        it is filling it. Otherwise this host's lease (if the fleet is on)
        for the upstream fill, or None. Every failure here falls through
        to the upstream: the fleet makes fetches fewer, never pulls fail."""
        found = await self._shared_lookup(digest)
        if found is not None:
            try:
                response = await self.shared.open(digest)
            except CancelledError:
                raise
            except Exception as e:
                log.warn("cannot read {digest} from the shared store: {e}", digest=digest, e=e)
            else:
                fill = self._new_fill(
                    response,
                    digest,
                    found.size,
                    found.meta,
                    claim,
                    self._shared_resume(digest, path, headers),
                    on_mismatch=self._shared_mismatch,
                )
                if fill is not None:
                    return Sourced(fill, "SHARED")
        if self.fleet is None or not digest.startswith("sha256:"):
            # (Members serve sha256 blobs only: nobody could follow the owner.)
            return None
        lease = await self.fleet.claim(digest)
        if not isinstance(lease, Elsewhere):
            return lease
        if lease.owner == self.fleet.advertise:
            # A process of this host holds the lease, yet this one holds the
            # disk lock: that process died mid-fill (its lease not yet
            # expired). Fill here; following ourselves would only wait.
            log.info("{digest}: this host's lease is a dead process's: filling", digest=digest)
            return None
        try:
            response, meta = await self.fleet.follow(lease.owner, digest)
        except PeerUnavailable as e:
            # Its owner is gone (its lease not yet expired) or unreachable:
            # fetch it here; the blob is verified either way.
            log.warn(
                "cannot follow {digest} at {owner} ({e}): filling it here",
                digest=digest,
                owner=lease.owner,
                e=e,
            )
            return None
        size = response.length if response.length is not UNKNOWN_LENGTH else None
        fill = self._new_fill(
            response, digest, size, meta, claim, self._peer_resume(digest, path, headers)
        )
        if fill is None:
            return None
        return Sourced(fill, "FLEET")

    def _shared_mismatch(self, digest: str) -> None:
        """The shared store handed back bytes that are not ``digest`` (rot,
        or an object put there by hand): forget it fleet-wide, so the next
        pull goes to the upstream instead of failing the same way."""
        self.metrics.mismatches.inc()
        log.error("the shared store's {digest} is corrupt: deleting it", digest=digest)
        ensureDeferred(self.shared.forget(digest)).addErrback(
            lambda f: log.warn("cannot delete {digest}: {e}", digest=digest, e=f.value)
        )

    async def _shared_lookup(self, digest: str) -> Any:
        if self.shared is None:
            return None
        try:
            return await self.shared.lookup(digest)
        except CancelledError:
            raise
        except Exception as e:  # down, slow (its deadline) or refusing
            self.metrics.shared_errors.inc()
            log.warn("shared store lookup of {digest} failed: {e}", digest=digest, e=e)
            return None

    def _shared_resume(self, digest: str, path: str, headers: Headers) -> Resume:
        """The shared store's stream was cut: the rest from it again, or,
        if it fails (down, or the object evicted meanwhile), from the
        upstream with ``Range``."""

        async def again(offset: int) -> IResponse | None:
            try:
                return await self.shared.open(digest, offset)
            except CancelledError:
                raise
            except Exception as e:
                log.warn(
                    "resume of {digest} from the store failed ({e}): from the upstream",
                    digest=digest,
                    e=e,
                )
            return await self._resume_from(path, headers, offset)

        return lambda offset: ensureDeferred(again(offset))

    def _peer_resume(self, digest: str, path: str, headers: Headers) -> Resume:
        """The owner's stream was cut: it may have died. The blob from the
        shared store if it got there, else from whoever holds the lease
        now; if that is this host, from the upstream with ``Range``."""

        async def again(offset: int) -> IResponse | None:
            found = await self._shared_lookup(digest)
            if found is not None:
                try:
                    return await self.shared.open(digest, offset)
                except CancelledError:
                    raise
                except Exception as e:
                    log.warn("cannot read {digest} from the store: {e}", digest=digest, e=e)
            lease = await self.fleet.claim(digest) if self.fleet is not None else None
            if isinstance(lease, Elsewhere) and lease.owner != self.fleet.advertise:
                try:
                    response, _ = await self.fleet.follow(lease.owner, digest, offset)
                    return response
                except PeerUnavailable as e:
                    # Dead, most likely, its lease not yet expired: the rest
                    # from the upstream rather than cutting our clients (a
                    # live but unreachable owner costs one fetch more).
                    log.warn("owner of {digest} unreachable: {e}", digest=digest, e=e)
            if isinstance(lease, Elsewhere):
                lease = None
            fill = self.in_flight.get(digest)
            if isinstance(lease, Owned) and not isinstance(fill, Fill):
                lease.release()
                lease = None
            if self.fleet is not None:
                self.fleet.takeovers += 1
            log.info(
                "took over {digest} from its owner at byte {offset}", digest=digest, offset=offset
            )
            if isinstance(fill, Fill):
                # The owner will not upload it now: this host does.
                self._publish_when_done(fill, lease)
            return await self._resume_from(path, headers, offset)

        return lambda offset: ensureDeferred(again(offset))

    async def _answer_from_shared(
        self, request: Request, digest: str, path: str, headers: Headers
    ) -> bool:
        """A HEAD, or with ``redirect`` a GET, of a blob only the shared
        store has: answered from it (after the privacy check)."""
        found = await self._shared_lookup(digest)
        if found is None:
            return False
        if await self._refused(request, found.meta, headers, path):
            return True
        note_cache(request, "SHARED")
        self.metrics.cache.labels("SHARED").inc()
        request.setHeader(*API_VERSION)
        request.setHeader(b"Docker-Content-Digest", digest.encode())
        request.setHeader(b"ETag", f'"{digest}"'.encode())
        if request.method == b"HEAD":
            request.setHeader(b"Content-Type", found.meta.media_type.encode())
            request.setHeader(b"Accept-Ranges", b"bytes")
            request.setHeader(b"Content-Length", b"%d" % found.size)
        else:
            request.setResponseCode(307)
            request.setHeader(b"Location", self.shared.redirect_url(digest).encode())
            request.setHeader(b"Content-Length", b"0")
        request.finish()
        return True

    def _publish_when_done(self, fill: Fill, owned: Owned | None) -> None:
        """Once ``fill`` is verified and on disk, upload it to the shared
        store; the fleet lease (if any) goes when that is done or failed.
        Once per fill, however many times it was taken over."""
        if fill in _PUBLISHING:
            return
        _PUBLISHING.add(fill)
        if self.shared is None:
            if owned is not None:
                fill.done.addBoth(lambda result: (owned.release(), result)[1])
            return

        async def upload(entry: Entry) -> None:
            entry.readers += 1  # not evicted from under the upload
            try:
                await self.shared.publish(
                    entry.digest, str(self.store.data_path(entry.digest)), entry.size, entry.meta
                )
            finally:
                entry.readers -= 1

        def release(_: object = None) -> None:
            if owned is not None:
                owned.release()

        def published(entry: Entry) -> Entry:
            # Apart from the fill's own chain: the fill is done (out of the
            # in-flight table) while its upload runs; the lease waits for it.
            ensureDeferred(upload(entry)).addErrback(
                lambda f: log.warn(
                    "cannot upload {digest} to the shared store: {e}", digest=fill.digest, e=f.value
                )
            ).addBoth(release)
            return entry

        def failed(failure: Failure) -> Failure:
            release()
            return failure

        fill.done.addCallbacks(published, failed)

    def _let_go(self, claim: Claim | None) -> None:
        """No fill after all: drop the lock (and its empty file) on the disk worker."""
        if claim is not None:
            self.hashers("sha256").run(claim.release).addErrback(
                lambda f: log.warn("cannot drop a fill lock: {error}", error=str(f.value))
            )

    def _fill(
        self,
        digest: str,
        meta: Meta,
        size: int | None,
        claim: Claim | None,
        resume: Resume,
        on_mismatch: Callable[[str], object] | None = None,
    ) -> Fill:
        """A fill of ``digest`` into this host's disk, whatever feeds it.
        Raises ``OSError`` when the disk cannot take it (full, no free
        descriptor)."""
        return Fill(
            self.store,
            self.hashers(digest.split(":", 1)[0]),
            digest,
            meta,
            size,
            self.clock,
            self.timeouts.body_idle,
            self.config.fill_timeout,
            on_mismatch=on_mismatch or (lambda _: self.metrics.mismatches.inc()),
            resume=resume,
            resume_attempts=self.config.resume_attempts,
            resume_window=self.config.fill_timeout,
            on_resume=lambda _: self.metrics.resumes.inc(),
            claim=claim,
        )

    def _new_fill(
        self,
        response: IResponse,
        digest: str,
        size: int | None,
        meta: Meta,
        claim: Claim | None,
        resume: Resume,
        on_mismatch: Callable[[str], object] | None = None,
    ) -> Fill | None:
        """A fill of ``digest`` fed by ``response`` (the shared store or
        another member), verified like any other; None if the disk cannot
        take it (the caller then goes to the upstream)."""
        try:
            fill = self._fill(digest, meta, size, claim, resume, on_mismatch)
        except OSError as e:
            log.warn("not caching {digest}: {error}", digest=digest, error=str(e))
            discard_body(response, self.clock, self.timeouts.body_idle)
            return None
        response.deliverBody(fill)
        # Bounded even if nobody ever reads it (the leader may have gone).
        fill.add_reader()
        fill.remove_reader()
        return fill

    async def _fetch_fill(
        self,
        digest: str,
        name: str,
        path: str,
        headers: Headers,
        claim: Claim | None,
        owned: Owned | None = None,
    ) -> tuple[Fill, Answer] | Answer:
        def give_up() -> None:
            """No fill from the upstream: the disk lock and the lease go."""
            self._let_go(claim)
            if owned is not None:
                owned.release()

        try:
            answer = await self.chain.request(b"GET", path, headers)
        except BaseException:
            give_up()
            raise
        if answer.code != 200 or answer.body is not None:
            give_up()
            return answer
        length = answer.response.length
        content_type = answer.headers.getRawHeaders(b"content-type", [OCTET_STREAM.encode()])[-1]
        meta = Meta(
            content_type.decode("latin-1"),
            name,
            self._surely_public(headers),
            self.registry.name,
        )
        try:
            fill = self._fill(
                digest,
                meta,
                None if length is UNKNOWN_LENGTH else length,
                claim,
                lambda offset: self._resume(path, headers, offset),
            )
        except OSError as e:
            # A full disk or no free descriptor: the client still gets the
            # blob, passed through; nothing is cached.
            log.warn("not caching {digest}: {error}", digest=digest, error=str(e))
            give_up()
            return answer
        answer.response.deliverBody(fill)
        if self.shared is not None or owned is not None:
            self._publish_when_done(fill, owned)
        # Bounded even if nobody ever reads it (the leader may have gone).
        fill.add_reader()
        fill.remove_reader()
        self.access.remember(headers, name)
        if not meta.public:
            ensureDeferred(self._settle_publicity(fill, name, path)).addErrback(
                lambda f: log.failure("publicity check failed", f)
            )
        return fill, answer

    def _resume(self, path: str, headers: Headers, offset: int) -> Deferred[IResponse | None]:
        """The blob again from byte ``offset``, for a fill whose upstream
        body was cut. A fresh GET to the registry, not the CDN URL again:
        the signed URL may have expired. Same headers as the first GET (the
        client's credentials or the mirror's identity): a fill outlives the
        client that started it, and must not read as anyone else."""
        return ensureDeferred(self._resume_from(path, headers, offset))

    async def _resume_from(self, path: str, headers: Headers, offset: int) -> IResponse | None:
        ranged = Headers(dict(headers.getAllRawHeaders()))
        ranged.setRawHeaders(b"range", [b"bytes=%d-" % offset])
        answer = await self.chain.request(b"GET", path, ranged)
        if answer.code in (200, 206) and answer.body is None:
            return answer.response
        log.warn(
            "resume of {path} from {offset} answered {code}",
            path=path,
            offset=offset,
            code=answer.code,
        )
        drop(answer, self.clock, self.timeouts.body_idle)
        return None

    async def _send_rest(
        self, request: Request, upstream: tuple[str, Headers], first: int, last: int
    ) -> None:
        """The cache's disk failed mid-fill: the client already has bytes up
        to ``first``; the rest comes straight from upstream (not cached)."""
        log.warn(
            "disk failed while filling: sending bytes {first}-{last} from upstream",
            first=first,
            last=last,
        )
        path, headers = upstream
        ranged = headers.copy()
        ranged.setRawHeaders(b"range", [b"bytes=%d-%d" % (first, last)])
        answer = await self.chain.request(b"GET", path, ranged)
        spans = answer.headers.getRawHeaders(b"content-range", [b""])[-1]
        if answer.code != 206 or not spans.startswith(b"bytes %d-" % first):
            drop(answer, self.clock, self.timeouts.body_idle)
            abort_client(request)
            return
        note_upstream(request, answer)
        await relay_body(request, answer.response, self.clock, self.timeouts)

    async def _settle_publicity(self, fill: Fill, name: str, path: str) -> None:
        # Before publication the meta is written with the blob; after, update it.
        fill.meta.public = await self.access.is_public(name, path)
        entry = self.store.entries.get(fill.digest) if fill.entry is not None else None
        if entry is not None:
            entry.meta = fill.meta
            # The file (and its fsync) on the disk worker.
            meta = json.dumps(dataclasses.asdict(fill.meta)).encode()
            self.hashers("sha256").run(self.store.write_meta, fill.digest, meta).addErrback(
                lambda f: log.warn(
                    "cannot update {digest}'s metadata: {error}",
                    digest=fill.digest,
                    error=str(f.value),
                )
            )

    async def _send_blob(
        self,
        request: Request,
        digest: str,
        size: int | None,
        meta: Meta,
        status: str,
        entry: Entry | None = None,
        fill: Fill | RemoteFill | None = None,
        upstream: tuple[str, Headers] | None = None,
    ) -> None:
        """Send a blob from the store or a fill. ``upstream`` (path and
        headers) is where the rest comes from if the cache's disk fails
        the fill while this client reads it."""
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
        if fill is not None and following is None:
            # Published already: read it as a hit, under the entry's lease.
            entry = self.store.get(digest)
            if entry is None:
                raise _Vanished()
        path: str | int | Path = self.store.data_path(digest)
        if isinstance(following, RemoteFill):
            # Its descriptor, not its path: see ``RemoteFill.source``.
            path = following.source
        elif following is not None:
            path = following.path
        if entry is not None:
            entry.readers += 1
        try:
            try:
                streaming = stream_file(
                    request,
                    path,
                    offset,
                    length,
                    following,
                    self.clock,
                    self.timeouts.client_idle,
                )
            except FileNotFoundError:
                raise _Vanished() from None
            except OSError as e:  # no free descriptor, say
                if upstream is None:
                    raise errors.RegistryError(
                        503, "UNAVAILABLE", f"cannot open the cached blob: {e.strerror or e}"
                    ) from None
                log.warn(
                    "cannot open {digest} ({error}): passing the request through",
                    digest=digest,
                    error=e.strerror or str(e),
                )
                path, headers = upstream
                await self._pass(request, path, headers)
                return
            await streaming
        except StoreFailed as e:
            if upstream is None or length is None:
                abort_client(request)
                return
            await self._send_rest(request, upstream, e.written, offset + length - 1)
        except FillFailed as e:
            record = getattr(request, "access", None)
            if record is not None:
                record.outcome = f"incomplete: {e}"
        finally:
            if entry is not None:
                entry.readers -= 1


@dataclass(frozen=True)
class Sourced:
    """A fill fed by the fleet rather than the upstream (``status``:
    SHARED from the bucket, FLEET from another member's fill): its
    leader is checked like a hit's client."""

    fill: Fill
    status: str


class _Vanished(Exception):
    """The blob went (evicted) between finding it and opening it."""


def _byte_range(value: bytes | None, size: int) -> tuple[int, int] | None:
    """(first, last) of a ``bytes=`` range already checked for syntax."""
    if value is None:
        return None
    first, _, last = value.strip()[6:].decode().partition("-")
    if not first:
        return max(0, size - int(last)), size - 1
    return int(first), min(int(last), size - 1) if last else size - 1


# Fills whose upload is chained already (a fill taken over twice is still one upload).
_PUBLISHING: weakref.WeakSet[Fill] = weakref.WeakSet()
# The outcome of a start that found the blob published by another process.
_PUBLISHED = object()
# Claims of one fill in a row (each after another process's fill failed).
CLAIM_TRIES = 3


def _fill_in(
    outcome: tuple[Fill, Answer] | Answer | RemoteFill | Sourced | object,
) -> Fill | RemoteFill | None:
    if isinstance(outcome, RemoteFill):
        return outcome
    if isinstance(outcome, Sourced):
        return outcome.fill
    return outcome[0] if isinstance(outcome, tuple) else None


def _drop_outcome(outcome: object, clock: IReactorTime, idle: float) -> None:
    """The leader left before the upstream answered: nobody reads an
    answer that did not become a fill."""
    if isinstance(outcome, Answer):
        drop(outcome, clock, idle)
