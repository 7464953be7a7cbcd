"""The shared tier: verified blobs, manifests and tag records in an
S3-compatible bucket that every host of a fleet reads and writes, behind
each host's own disk cache (the first tier).

Layout under the configured prefix::

    blobs/sha256/<hex>                      a verified blob or manifest;
                                            its ``Meta`` in x-amz-meta-mirrord
    tags/<registry>/<repository>/<tag>      a ``TagRecord`` as JSON

Objects appear only whole and verified: a blob is uploaded after this host
verified its digest, and S3 shows a multipart upload only once it is
completed. Every call is bounded by the client's deadline and its circuit
breaker: a bucket that hangs or fails raises ``S3Unavailable`` at once and
the caller goes on with its local disk and the upstream.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import DeferredSemaphore, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from mirrord.store.disk import Meta, TagRecord
from mirrord.store.s3.client import ObjectInfo, S3Client, S3Error, S3Unavailable, parse_time

log = Logger()

META_HEADER = "mirrord"
# Small objects read whole: manifests and tag records.
MAX_SMALL = 4 << 20
# A blob's access time is sent to the fleet's index at most this often per host.
TOUCH_EVERY = 60.0
# How long a host's tag pins hold after it last said them (it says them
# every minute from worker 1).
PIN_TTL = 300.0
# Rounds of eviction candidates one eviction asks for (past repository pins).
EVICTION_ROUNDS = 10
# Blobs listed per reconcile of the fleet's index with the bucket.
LISTED = 1_000_000


@dataclass(frozen=True)
class BucketBlob:
    """A blob the bucket holds."""

    digest: str
    size: int
    meta: Meta


def blob_key(digest: str) -> str:
    algorithm, hexdigest = digest.split(":", 1)
    return f"blobs/{algorithm}/{hexdigest}"


def tag_key(registry: str, name: str, tag: str) -> str:
    return f"tags/{registry}/{name}/{tag}"


def encode_meta(meta: Meta) -> dict[str, str]:
    return {META_HEADER: json.dumps(dataclasses.asdict(meta), separators=(",", ":"))}


def decode_meta(info: ObjectInfo) -> Meta:
    """The blob's ``Meta``; an object without one (put there by hand) is
    treated as private: every client is checked against the upstream."""
    try:
        values = json.loads(info.metadata.get(META_HEADER, ""))
        return Meta(**{k: values[k] for k in ("media_type", "repository", "public", "registry")})
    except (ValueError, KeyError, TypeError):
        return Meta(info.content_type or "application/octet-stream", "", False, "")


@dataclass
class Bucket:
    """The store interface's S3 backend (see ``mirrord.store.interface``)."""

    client: S3Client
    clock: IReactorTime
    # The fleet's index of the bucket (``mirrord.fleet.index``), for the cap
    # by last access; None: no cap is kept.
    index: Any = None
    max_size: int = 0
    redirect_ttl: float = 600.0
    part_size: int = 16 << 20
    # [cache] pinned: repository patterns pin what is uploaded under them,
    # fleet-wide (tag patterns are pinned by ``pin_tags``).
    pinned: tuple[str, ...] = ()
    # This host's name in the fleet (its tag pins are kept under it).
    host: str = "host"
    _touched: dict[str, float] = field(default_factory=dict)
    # Uploads this host runs now: a second verified fill of the same digest
    # (another registry, say) does not upload it twice.
    _uploading: set[str] = field(default_factory=set)
    uploads: int = 0
    upload_failures: int = 0
    # Uploads at once per process (the rest wait their turn).
    uploads_at_once: int = 2
    peak_uploads: int = 0
    _running: int = 0
    _turns: DeferredSemaphore = field(init=False)

    def __post_init__(self) -> None:
        self._turns = DeferredSemaphore(self.uploads_at_once)

    @property
    def healthy(self) -> bool:
        return self.client.breaker.state == "closed"

    async def lookup(self, digest: str) -> BucketBlob | None:
        """The blob if the bucket holds it (``S3Unavailable`` if it cannot say)."""
        info = await self.client.head(blob_key(digest))
        if info is None:
            return None
        return BucketBlob(digest, info.size, decode_meta(info))

    async def open(self, digest: str, first: int = 0) -> IResponse:
        """The blob's bytes from ``first`` on, streaming (200 or 206)."""
        response = await self.client.get(blob_key(digest), first if first else None)
        self.touch(digest)
        return response

    def redirect_url(self, digest: str) -> str:
        """A presigned GET of the blob, valid for ``redirect_ttl`` seconds."""
        self.touch(digest)
        return self.client.presign_get(blob_key(digest), int(self.redirect_ttl))

    async def publish(self, digest: str, path: str, size: int, meta: Meta) -> bool:
        """Upload a blob this host verified, unless the bucket has it;
        whether it was uploaded now."""
        if digest in self._uploading:
            return False
        self._uploading.add(digest)
        try:
            if await self.client.head(blob_key(digest)) is not None:
                return False
            # A few at a time: each holds up to two parts in memory and
            # reads and hashes on the disk worker, which fills share.
            await self._turns.acquire()
            self._running += 1
            self.peak_uploads = max(self.peak_uploads, self._running)
            try:
                await self.client.upload_file(
                    blob_key(digest), path, size, meta.media_type, encode_meta(meta), self.part_size
                )
            finally:
                self._running -= 1
                self._turns.release()
            self.uploads += 1
            await self._indexed(digest, size, meta)
            return True
        except BaseException:
            self.upload_failures += 1
            raise
        finally:
            self._uploading.discard(digest)

    async def get_small(self, digest: str) -> tuple[bytes, Meta] | None:
        """A manifest the bucket holds, with its ``Meta`` (the caller verifies it)."""
        info = await self.client.head(blob_key(digest))
        if info is None or info.size > MAX_SMALL:
            return None
        data = await self.client.get_bytes(blob_key(digest), MAX_SMALL)
        if data is None:
            return None
        self.touch(digest)
        return data, decode_meta(info)

    async def put_small(self, digest: str, data: bytes, meta: Meta) -> None:
        """Store a verified manifest (a no-op when it is there already)."""
        stored = await self.client.put_bytes(
            blob_key(digest), data, meta.media_type, encode_meta(meta), if_none_match=True
        )
        if stored:
            await self._indexed(digest, len(data), meta)

    async def get_tag(self, registry: str, name: str, tag: str) -> TagRecord | None:
        data = await self.client.get_bytes(tag_key(registry, name, tag), MAX_SMALL)
        if data is None:
            return None
        try:
            return TagRecord(**json.loads(data))
        except (ValueError, TypeError):
            log.warn("unreadable tag record {key} in the bucket", key=tag_key(registry, name, tag))
            return None

    async def put_tag(self, registry: str, name: str, tag: str, record: TagRecord) -> None:
        data = json.dumps(dataclasses.asdict(record)).encode()
        await self.client.put_bytes(tag_key(registry, name, tag), data, "application/json", {})

    def touch(self, digest: str) -> None:
        """Tell the fleet's index the blob was read (at most once a minute a host)."""
        if self.index is None:
            return
        now = self.clock.seconds()
        if now - self._touched.get(digest, -TOUCH_EVERY) < TOUCH_EVERY:
            return
        self._touched[digest] = now
        if len(self._touched) > 100_000:
            self._touched.clear()
        _quietly(self.index.touch(digest, now), "touch")

    async def _indexed(self, digest: str, size: int, meta: Meta) -> None:
        if self.index is None:
            return
        try:
            await self.index.set_repository(digest, meta.repository)
            total = await self.index.add(digest, size, self.clock.seconds())
        except Exception as e:  # Redis down: the bucket still has it
            log.warn("cannot index {digest} in the fleet: {error}", digest=digest, error=str(e))
            return
        if self.max_size and total > self.max_size:
            # Apart from the upload: its lease and caller need not wait.
            _quietly(self.evict(total - self.max_size), "eviction")

    async def forget(self, digest: str) -> None:
        """Delete a blob found corrupt, from the bucket and the fleet's index."""
        await self.client.delete(blob_key(digest))
        if self.index is not None:
            await self.index.remove(digest)

    async def pin_tags(self, digests: set[str]) -> None:
        """Pin, fleet-wide, what this host's pinned tags need (``[cache]
        pinned`` tag patterns), for ``PIN_TTL``: each host says all of its
        own every minute, and the fleet's pins are what some host said last."""
        if self.index is not None:
            await self.index.host_pins(self.host, digests, PIN_TTL)

    async def evict(self, over: int) -> int:
        """Delete the least recently read blobs (pins kept) until ``over``
        bytes are gone; each claimed in the index first, so two hosts never
        both count one deletion. Returns the bytes freed."""
        freed = 0
        patterns = [p for p in self.pinned if ":" not in p]
        # Candidates come oldest first, enough to free ``over`` bytes; those
        # a repository pin keeps are passed over and more are asked for.
        passed: set[str] = set()
        kept = 0
        for _ in range(EVICTION_ROUNDS):
            candidates = [
                (d, size)
                for d, size in await self.index.eviction_candidates(over - freed + kept, 1000)
                if d not in passed
            ]
            if not candidates:
                break
            repositories = (
                await self.index.repositories([d for d, _ in candidates]) if patterns else {}
            )
            for digest, size in candidates:
                if freed >= over:
                    return freed
                passed.add(digest)
                repository = repositories.get(digest, "")
                if any(fnmatch.fnmatchcase(repository, p) for p in patterns):
                    kept += size  # a repository pin ([cache] pinned)
                    continue
                freed += await self._evict_one(digest, size)
            if freed >= over:
                break
        return freed

    async def _evict_one(self, digest: str, size: int) -> int:
        # Only while the fleet's total is over the cap: two hosts evicting
        # at once free at most one blob more than needed.
        if not await self.index.claim_eviction(digest, above=self.max_size):
            return 0
        try:
            await self.client.delete(blob_key(digest))
        except (S3Error, S3Unavailable) as e:
            # Unindexed but present: the next reconcile counts it again.
            log.warn("cannot delete {digest} from the bucket: {error}", digest=digest, error=e)
            return 0
        log.info("evicted {digest} ({size} bytes) from the bucket", digest=digest, size=size)
        return size

    async def reconcile(self) -> None:
        """Make the fleet's index agree with what the bucket holds (after
        a crash between an upload and its indexing, or the other way)."""
        if self.index is None:
            return
        started = self.clock.seconds()
        listing = await self.client.list("blobs/", LISTED)
        if len(listing) >= LISTED:
            # A partial listing would make the rest look gone from the bucket.
            log.warn("bucket holds {count}+ blobs: index not reconciled", count=LISTED)
            return
        await self.index.reconcile(
            [(_digest_of_key(key), size, parse_time(modified)) for key, size, modified in listing],
            started,
        )

    async def abort_stale_uploads(self, older_than: float) -> int:
        return await self.client.abort_stale_uploads(older_than)


def _digest_of_key(key: str) -> str:
    _, algorithm, hexdigest = key.rsplit("/", 2)
    return f"{algorithm}:{hexdigest}"


def _quietly(work: Any, what: str) -> None:
    """Fire-and-forget fleet bookkeeping: a failure is logged, never raised."""
    ensureDeferred(work).addErrback(
        lambda f: log.warn("fleet index {what} failed: {e}", what=what, e=f.value)
    )
