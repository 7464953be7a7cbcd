"""The internal endpoint other hosts of the fleet read blobs from.

``/_mirrord/fleet/blobs/<digest>`` sends a blob this host holds, or is
filling, to another host of the fleet, which takes the response as the
upstream body of its own ``Fill`` and verifies the digest itself. So this
side only streams: a published blob from the store under its reader
lease, a running fill followed as it grows (``stream_file`` with
``following``, as a local client follows it in ``mirrord.serve.blobs``),
with the client's flow control and idle bound. A fill that fails mid-body
aborts the connection: the other host must see a cut, never a clean
short body. ``Range: bytes=N-`` lets the other host resume after a cut.

Every request is signed with the fleet's key (``mirrord.fleet.secret``)
over its method and full path; anything else is a 401 before the store
is looked at. ``/_mirrord/fleet/health`` answers whether this host is up
and shares the key.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mirrord.fleet.secret import FleetSecret
from mirrord.registry import errors
from mirrord.registry.errors import RegistryError
from mirrord.registry.respond import abort_client, peer_address, write_error
from mirrord.store.disk import BlobStore, Entry, Meta
from mirrord.store.fill import Fill, FillFailed, StoreFailed, stream_file
from mirrord.store.follow import RemoteFill
from mirrord.store.inflight import InFlight, Starting
from mirrord.store.shared import Claim, Published

log = Logger()

META_HEADER = b"X-Mirrord-Meta"
# Only what a host of this fleet fills: the store is sha256-addressed.
DIGEST = re.compile(rb"sha256:[0-9a-f]{64}")
# ``bytes=N-`` only: a resume. 19 digits keep N a sane integer.
_RESUME = re.compile(rb"bytes=([0-9]{1,19})-")
# Seconds to wait for a fill still waiting for its upstream's headers; the
# other host's own deadline is usually shorter, and its leaving cancels it.
START_WAIT = 30.0
# Looks at the store and the in-flight table for one request: a start can
# settle into another start (its leader's upstream refused; the next tries).
LOOKS = 4

Run = Callable[..., "Deferred[Any]"]


def unauthorized() -> RegistryError:
    return RegistryError(401, "UNAUTHORIZED", "fleet authentication required")


def blob_unknown(digest: str) -> RegistryError:
    return RegistryError(404, "BLOB_UNKNOWN", f"this host has no blob {digest} and no fill of it")


def meta_header(meta: Meta) -> bytes:
    """``Meta`` as the compact ASCII JSON of ``X-Mirrord-Meta``."""
    record = json.dumps(dataclasses.asdict(meta), separators=(",", ":"), ensure_ascii=True)
    return record.encode("ascii")


class FleetResource(Resource):
    """``/_mirrord/fleet``: blobs and health for the fleet's other hosts.

    ``run`` runs blocking calls off the reactor (the disk worker), for the
    one look on disk a request may take; ``client_idle`` bounds how long a
    reading host may keep the transfer paused."""

    isLeaf = True

    def __init__(
        self,
        secret: FleetSecret,
        store: BlobStore | None,
        in_flight: InFlight,
        clock: IReactorTime,
        client_idle: float,
        run: Run,
        start_wait: float = START_WAIT,
        skew: float = 60.0,
        follow_idle: float = 300.0,
        fill_timeout: float = 600.0,
    ) -> None:
        super().__init__()
        self._secret = secret
        self._store = store
        self._in_flight = in_flight
        self._clock = clock
        self._client_idle = client_idle
        self._run = run
        self._start_wait = start_wait
        self._skew = skew
        self._follow_idle = follow_idle
        self._fill_timeout = fill_timeout

    def render(self, request: Request) -> bytes | int:
        # The signature first: a caller without the key learns nothing, not
        # even which paths exist. It covers the whole URI, query included.
        header = request.getHeader(b"authorization")
        if not self._secret.verify(
            header, request.method, request.uri, self._clock.seconds(), self._skew
        ):
            log.warn(
                "fleet request refused from {peer}: {why}",
                peer=peer_address(request),
                why="no signature" if header is None else "bad or stale signature",
            )
            request.setHeader(b"WWW-Authenticate", b"MirrordFleet")
            write_error(request, unauthorized())
            return NOT_DONE_YET
        if request.method not in (b"GET", b"HEAD"):
            write_error(request, errors.unsupported_method(request.method.decode("latin-1")))
            return NOT_DONE_YET
        parts = request.postpath
        if parts == [b"health"]:
            return self._health(request)
        if len(parts) != 2 or parts[0] != b"blobs":
            write_error(request, errors.not_found(request.path.decode("latin-1")))
            return NOT_DONE_YET
        if DIGEST.fullmatch(parts[1]) is None:
            write_error(request, errors.digest_invalid(parts[1].decode("latin-1")))
            return NOT_DONE_YET
        offset = 0
        wanted = request.getHeader(b"range")
        if wanted is not None:
            resume = _RESUME.fullmatch(wanted.strip())
            if resume is None:
                write_error(request, errors.range_invalid(wanted.decode("latin-1")))
                return NOT_DONE_YET
            offset = int(resume.group(1))
        finished = request.notifyFinish()
        work = ensureDeferred(self._serve(request, parts[1].decode("ascii"), offset))
        finished.addErrback(lambda _: work.cancel())
        work.addErrback(self._failed, request)
        return NOT_DONE_YET

    def _health(self, request: Request) -> bytes:
        body = b'{"ok":true}'
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return b"" if request.method == b"HEAD" else body

    async def _serve(self, request: Request, digest: str, offset: int) -> None:
        looked = False
        for _ in range(LOOKS):
            entry = self._store.get(digest) if self._store is not None else None
            if entry is not None:
                if await self._send(request, digest, offset, entry.size, entry.meta, entry=entry):
                    return
                continue
            current = self._in_flight.get(digest)
            if isinstance(current, Starting):
                await self._wait_for_start(current)
                continue
            if current is not None:
                size = current.written if current.verified else current.expected_size
                if await self._send(request, digest, offset, size, current.meta, fill=current):
                    return
                continue
            if not looked and self._store is not None:
                # Another process of this host (a worker) may have published
                # it, or be filling it: the lease names the host, not the
                # worker this connection reached.
                looked = True
                found = await self._run(self._store.find, digest)
                if found is not None:
                    self._store.adopt(found)
                    continue
                other = await self._other_process(digest)
                if other is not None:
                    size = other.expected_size
                    if await self._send(request, digest, offset, size, other.meta, fill=other):
                        return
                continue
            raise blob_unknown(digest)
        raise RegistryError(503, "UNAVAILABLE", f"{digest} keeps changing state; try again")

    async def _other_process(self, digest: str) -> RemoteFill | None:
        """Another process of this host filling ``digest``, to follow from
        its file; None when none is (or it just published: look again)."""
        assert self._store is not None
        try:
            claim = await self._claim(digest)
        except Published:
            return None
        if claim.locked:  # nobody was filling it: not ours to start
            await self._run(claim.release)
            return None
        follower = RemoteFill(
            self._store,
            claim,
            digest,
            self._run,
            self._clock,
            self._follow_idle,
            self._fill_timeout,
        )
        try:
            return await follower.start()
        except FillFailed:
            return None

    def _claim(self, digest: str) -> Deferred[Claim]:
        """The digest's fill lock, taken on the disk worker. A caller that
        leaves meanwhile must not leave the lock held (nothing would ever
        write that file, and this host's next fill of the digest would wait
        on it): the claim then is released as soon as it is taken."""
        taking = self._run(self._store.claim, digest)
        left = False

        def leave(_: Deferred[Claim]) -> None:
            nonlocal left
            left = True

        waiter: Deferred[Claim] = Deferred(leave)

        def taken(result: Any) -> None:
            if not left:
                waiter.callback(result)
            elif isinstance(result, Claim):
                self._run(result.release).addErrback(lambda _: None)

        taking.addBoth(taken)
        return waiter

    async def _wait_for_start(self, starting: Starting[Any]) -> None:
        """Until the fill has its upstream's headers (or none comes), bounded."""
        try:
            await starting.wait().addTimeout(self._start_wait, self._clock)
        except TimeoutError:
            raise RegistryError(
                503, "UNAVAILABLE", f"the fill has not started after {self._start_wait:g}s"
            ) from None

    async def _send(
        self,
        request: Request,
        digest: str,
        offset: int,
        size: int | None,
        meta: Meta,
        entry: Entry | None = None,
        fill: Fill | RemoteFill | None = None,
    ) -> bool:
        """Send the blob from byte ``offset``: from the store (``entry``) or
        following ``fill``. False when it went before it could be opened
        (evicted, or a fill that failed or was published meanwhile): look again."""
        if fill is not None and fill.error is not None:
            return False
        following = fill if fill is not None and fill.entry is None else None
        if fill is not None and following is None:
            # Published already: read it as a hit, under the entry's lease.
            entry = self._store.get(digest) if self._store is not None else None
            if entry is None:
                return False
            size = entry.size
        request.setHeader(b"Docker-Content-Digest", digest.encode("ascii"))
        request.setHeader(b"Content-Type", meta.media_type.encode("latin-1", "replace"))
        request.setHeader(META_HEADER, meta_header(meta))
        request.setHeader(b"Accept-Ranges", b"bytes")
        length = size
        if offset:
            if size is None:
                # No Content-Range can say where an unknown end is.
                raise RegistryError(
                    503, "UNAVAILABLE", "the blob's size is not known yet: no range of it"
                )
            if offset >= size:
                request.setHeader(b"Content-Range", b"bytes */%d" % size)
                raise errors.range_invalid(f"bytes={offset}-")
            request.setResponseCode(206)
            request.setHeader(b"Content-Range", b"bytes %d-%d/%d" % (offset, size - 1, size))
            length = size - offset
        if length is not None:
            request.setHeader(b"Content-Length", b"%d" % length)
        if request.method == b"HEAD":
            request.finish()
            return True
        path: str | int | Path
        if isinstance(following, RemoteFill):
            path = following.source  # its descriptor: see ``RemoteFill.source``
        elif following is not None:
            path = following.path
        else:
            assert self._store is not None
            path = self._store.data_path(digest)
        if entry is not None:
            entry.readers += 1
        try:
            try:
                streaming = stream_file(
                    request, path, offset, length, following, self._clock, self._client_idle
                )
            except FileNotFoundError:
                return False
            except OSError as e:  # no free descriptor, say
                raise RegistryError(
                    503, "UNAVAILABLE", f"cannot open the blob: {e.strerror or e}"
                ) from None
            sent = await streaming
            log.info(
                "fleet: sent {digest} from {offset} to {peer}: {sent} bytes",
                digest=digest,
                offset=offset,
                peer=peer_address(request),
                sent=sent,
            )
        except StoreFailed as e:
            # This host's disk failed the fill: no upstream to finish from
            # here; the other host resumes elsewhere after the cut.
            log.warn("fleet: {digest} cut for {peer}: {why}", digest=digest, why=str(e),
                     peer=peer_address(request))  # fmt: skip
            abort_client(request)
        except FillFailed as e:
            # The streamer cut the connection already (or the host left).
            log.info("fleet: {digest} not sent whole: {why}", digest=digest, why=str(e))
        finally:
            if entry is not None:
                entry.readers -= 1
        return True

    def _failed(self, failure: Failure, request: Request) -> None:
        if failure.check(CancelledError):
            return
        if not failure.check(RegistryError):
            log.failure("fleet request for {path} failed", failure, path=request.path)
        if request.startedWriting:
            abort_client(request)  # a short body must not look complete
            return
        if failure.check(RegistryError):
            write_error(request, failure.value)
        else:
            write_error(request, RegistryError(503, "UNAVAILABLE", "internal error"))
