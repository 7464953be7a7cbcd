"""The pull-through cache in the request path (a ``Backend`` of
``mirrord.serve.v2``): what is immutable is served local-first
(``blobs``, manifests by digest), what is mutable is revalidated
remote-first (``manifests`` by tag). ``/v2/`` is answered locally when no
upstream can answer it, so clients' first probe still works during an
outage."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from twisted.web.http_headers import Headers
from twisted.web.server import Request

from mirrord.registry import errors
from mirrord.registry.reference import Kind, Reference
from mirrord.registry.respond import API_VERSION
from mirrord.serve.answer import note_cache, write_answer
from mirrord.serve.blobs import Blobs
from mirrord.serve.cached import CacheContext
from mirrord.serve.manifests import Manifests
from mirrord.store.inflight import InFlight
from mirrord.upstream.bodies import discard_body
from mirrord.upstream.chain import FAILOVER_CODES, Answer


@dataclass
class PullThrough(CacheContext):
    """Serves one registry's blobs and manifests through the store."""

    def __post_init__(self) -> None:
        if self.in_flight is None:
            self.in_flight = InFlight(self._update_gauges)
        parts = {f.name: getattr(self, f.name) for f in dataclasses.fields(CacheContext)}
        self.blobs = Blobs(**parts)
        self.manifests = Manifests(**parts)
        self._update_gauges()

    async def serve(
        self, request: Request, ref: Reference, name: str, path: str, headers: Headers
    ) -> None:
        if ref.kind is Kind.BLOB:
            await self.blobs.serve(request, ref.reference, name, path, headers)
        elif ref.kind is Kind.MANIFEST and ref.by_digest:
            await self.manifests.by_digest(request, ref.reference, name, path, headers)
        elif ref.kind is Kind.MANIFEST:
            await self.manifests.by_tag(request, ref.reference, name, path, headers)
        elif ref.kind is Kind.BASE:
            await self._base(request, path, headers)
        else:
            await self._pass(request, path, headers)

    def serve_now(
        self, request: Request, ref: Reference, name: str, path: str, headers: Callable[[], Headers]
    ) -> bool:
        if ref.kind is not Kind.MANIFEST:
            return False
        if ref.by_digest:
            return self.manifests.by_digest_now(request, ref.reference, path, headers)
        return self.manifests.by_tag_now(request, ref.reference, name, headers)

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
            discard_body(answer.response, self.clock, self.timeouts.body_idle)
        note_cache(request, "STALE")
        request.setHeader(*API_VERSION)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", b"2")
        request.write(b"{}")
        request.finish()
