"""What blob and manifest serving asks of a shared store, whatever keeps
it. The host's disk cache (``mirrord.store.disk``) is always the first
tier: fills spool to it and clients follow the spool. A shared store is
the second tier, the one every host of a fleet sees: ``Bucket``
(``mirrord.store.bucket``, S3-compatible) implements it.

Every method may raise ``S3Unavailable`` (or the backend's like error):
the caller then serves from its disk and the upstream, never waits longer
than the store's deadline."""

from __future__ import annotations

from typing import Protocol

from twisted.web.iweb import IResponse

from mirrord.store.disk import Meta, TagRecord


class SharedBlob(Protocol):
    digest: str
    size: int
    meta: Meta


class SharedStore(Protocol):
    healthy: bool

    async def lookup(self, digest: str) -> SharedBlob | None:
        """The blob if the store holds it (verified: nothing else is there)."""

    async def open(self, digest: str, first: int = 0) -> IResponse:
        """Its bytes from ``first`` on, as a response to deliver into a
        consumer (with backpressure) and verify again on the way."""

    def redirect_url(self, digest: str) -> str:
        """A short-lived URL a client may fetch the blob from directly."""

    async def publish(self, digest: str, path: str, size: int, meta: Meta) -> bool:
        """Store a blob this host verified (whole or not at all)."""

    async def get_small(self, digest: str) -> tuple[bytes, Meta] | None:
        """A manifest's bytes and ``Meta``."""

    async def put_small(self, digest: str, data: bytes, meta: Meta) -> None:
        """Store a verified manifest."""

    async def get_tag(self, registry: str, name: str, tag: str) -> TagRecord | None:
        """The digest a tag last resolved to on any host."""

    async def put_tag(self, registry: str, name: str, tag: str, record: TagRecord) -> None:
        """Record a tag's digest for every host."""

    async def forget(self, digest: str) -> None:
        """Delete a blob found corrupt (it did not hash to its digest)."""

    async def evict(self, over: int) -> int:
        """Delete the least recently read blobs until ``over`` bytes are gone."""
