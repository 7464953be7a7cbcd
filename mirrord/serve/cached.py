"""What the blob path and the manifest path share: the registry's
upstream chain and the store, the privacy check, and passing an upstream
answer through when the cache cannot serve it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from mirrord.config import CacheConfig, Registry, Timeouts
from mirrord.metrics import Metrics
from mirrord.registry import errors
from mirrord.registry.challenges import RealmBook
from mirrord.serve.answer import copy_headers, note_cache, note_upstream, write_answer
from mirrord.serve.clients import challenge_anonymous
from mirrord.serve.privacy import AccessChecks, AnonymousRefusal
from mirrord.store.disk import BlobStore, Meta, TagStore
from mirrord.store.inflight import InFlight
from mirrord.store.worker import Hasher, InlineHasher
from mirrord.upstream.bodies import discard_body
from mirrord.upstream.chain import Answer, UpstreamChain
from mirrord.upstream.identity import is_mirror, scope_for

if TYPE_CHECKING:
    from mirrord.fleet.coordinator import Fleet
    from mirrord.store.interface import SharedStore

OCTET_STREAM = "application/octet-stream"


@dataclass
class CacheContext:
    """One registry's cache path: its chain, the shared store and checks."""

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
    # The fleet's shared store (``mirrord.store.bucket``), behind the disk.
    shared: SharedStore | None = None
    # Answer blob hits of the shared store with a 307 to it.
    redirect: bool = False
    # One upstream fetch per blob across hosts (``mirrord.fleet.coordinator``).
    fleet: Fleet | None = None

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

    def _surely_public(self, headers: Headers) -> bool:
        """Did the upstream serve this to no credentials at all? (The
        mirror's own requests count as none only without an account.)"""
        if is_mirror(headers):
            return self.chain.account is None
        return not headers.hasHeader(b"authorization")

    async def _publicity(self, headers: Headers, name: str, path: str) -> bool:
        if self._surely_public(headers):
            return True
        return await self.access.is_public(name, path)

    def _update_gauges(self) -> None:
        self.metrics.update_cache(self.store)

    async def _refused(self, request: Request, meta: Meta, headers: Headers, path: str) -> bool:
        """Apply the privacy rule; a refused client gets the upstream's answer."""
        refusal = await self.access.check(headers, meta, path)
        if refusal is None:
            return False
        if isinstance(refusal, AnonymousRefusal):
            challenge_anonymous(request, self.realms, scope_for(path))
            return True
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


def accepts(request: Request, media_type: str) -> bool:
    values = request.requestHeaders.getRawHeaders(b"accept")
    if not values:
        return True
    offered = {
        v.split(b";")[0].strip().decode("latin-1") for raw in values for v in raw.split(b",")
    }
    return media_type in offered or "*/*" in offered


def drop(answer: Answer | None, clock: IReactorTime, idle: float) -> None:
    """Let go of an answer we will not pass on (its body drained, bounded)."""
    if answer is not None and answer.body is None:
        discard_body(answer.response, clock, idle)
