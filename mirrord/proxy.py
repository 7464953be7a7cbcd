"""The ``/v2/`` resource: parse, decide, ask upstream, stream the answer back.

The resource never touches the network itself: it asks a ``Fetcher`` (the
upstream chain today; a cache in front of it later) for an ``Answer`` and
writes that answer to the client, relaying the body with backpressure.
When the client disconnects, the pending work is cancelled.
"""

from __future__ import annotations

import re
from typing import Protocol as TypingProtocol
from urllib.parse import urlencode

from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mirrord import errors, reference
from mirrord.auth import RealmBook, rewrite_challenges
from mirrord.config import Registry, Timeouts
from mirrord.headers import client_response_headers, upstream_request_headers
from mirrord.reference import Kind, Reference
from mirrord.respond import API_VERSION, client_address, client_host, write_error
from mirrord.streaming import TransferIncomplete, discard_body, relay_body
from mirrord.upstream import Answer

log = Logger()

_RANGE_RE = re.compile(rb"bytes=(\d+-\d*|-\d+)")
ALLOWED_METHODS = (b"GET", b"HEAD")


class Fetcher(TypingProtocol):
    """Where answers come from: an upstream chain, or a cache in front of one."""

    async def request(self, method: bytes, path: str, headers: Headers) -> Answer: ...


def upstream_name(ref: Reference, registry: Registry) -> str:
    """Docker Hub serves official images under ``library/``."""
    if registry.official_prefix and ref.name and "/" not in ref.name:
        return f"{registry.official_prefix}/{ref.name}"
    return ref.name


def check_range(value: bytes | None) -> None:
    """Only a single byte range is supported; anything else is unsatisfiable."""
    if value is None:
        return
    if not _RANGE_RE.fullmatch(value.strip()):
        raise errors.range_invalid(value.decode("latin-1"))
    first, _, last = value.strip()[6:].partition(b"-")
    if first and last and int(last) < int(first):
        raise errors.range_invalid(value.decode("latin-1"))


class RegistryProxy(Resource):
    """Serves ``/v2/`` for one registry through its ``Fetcher``."""

    isLeaf = True

    def __init__(
        self,
        registry: Registry,
        fetcher: Fetcher,
        realms: RealmBook,
        clock: IReactorTime,
        timeouts: Timeouts,
    ) -> None:
        super().__init__()
        self._registry = registry
        self._fetcher = fetcher
        self._realms = realms
        self._clock = clock
        self._timeouts = timeouts

    def render(self, request: Request) -> bytes | int:
        try:
            ref = self._parse(request)
        except errors.RegistryError as e:
            write_error(request, e)
            return NOT_DONE_YET
        work = ensureDeferred(self._serve(request, ref))
        request.notifyFinish().addErrback(lambda _: work.cancel())
        work.addErrback(self._failed, request)
        return NOT_DONE_YET

    def _parse(self, request: Request) -> Reference:
        if request.method not in ALLOWED_METHODS:
            raise errors.unsupported_method(request.method.decode("latin-1"))
        path = request.path
        if path in (b"/v2", b"/v2/"):
            return reference.Reference(Kind.BASE)
        try:
            rest = path[len(b"/v2/") :].decode("ascii")
        except UnicodeDecodeError:
            raise errors.name_invalid(path.decode("latin-1")) from None
        ref = reference.parse(rest)
        if ref.kind is Kind.BLOB:
            check_range(request.getHeader(b"range"))
        return ref

    async def _serve(self, request: Request, ref: Reference) -> None:
        path = ref.path(upstream_name(ref, self._registry)) + self._query(request, ref)
        headers = upstream_request_headers(
            request.requestHeaders, client_address(request), request.isSecure()
        )
        answer = await self._fetcher.request(request.method, path, headers)
        record = getattr(request, "access", None)
        if record is not None:
            record.upstream = answer.upstream
            record.redirects = answer.redirects
            record.fell_back = answer.fell_back
        await self._respond(request, answer)

    def _query(self, request: Request, ref: Reference) -> str:
        """Only the tag list takes parameters (pagination)."""
        if ref.kind is not Kind.TAGS:
            return ""
        params = [
            (key.decode("latin-1"), value.decode("latin-1"))
            for key in (b"n", b"last")
            for value in request.args.get(key, [])
        ]
        return "?" + urlencode(params) if params else ""

    async def _respond(self, request: Request, answer: Answer) -> None:
        if answer.code == 416 and answer.body is None:
            # distribution 2.8 sends a short body with a whole-blob
            # Content-Length here: answer for it rather than relay it.
            discard_body(answer.response)
            write_error(request, errors.range_invalid(request.getHeader(b"range") or ""))
            return
        request.setResponseCode(answer.code)
        for name, values in client_response_headers(answer.headers):
            request.responseHeaders.setRawHeaders(name, values)
        request.setHeader(*API_VERSION)
        challenges = answer.headers.getRawHeaders(b"www-authenticate")
        if challenges:
            token_url = f"https://{client_host(request)}/token"
            request.responseHeaders.setRawHeaders(
                b"www-authenticate", rewrite_challenges(challenges, self._realms, token_url)
            )
        if answer.body is not None:
            request.setHeader(b"Content-Length", b"%d" % len(answer.body))
            request.write(answer.body)
            request.finish()
            return
        try:
            await relay_body(request, answer.response, self._clock, self._timeouts)
        except TransferIncomplete as e:
            record = getattr(request, "access", None)
            if record is not None:
                record.outcome = f"incomplete: {e}"

    def _failed(self, failure: Failure, request: Request) -> None:
        if failure.check(CancelledError):
            return None
        if failure.check(errors.RegistryError):
            write_error(request, failure.value)
            return None
        log.failure("proxying {path} failed", failure, path=request.path)
        write_error(request, errors.bad_gateway("internal error while proxying"))
        return None
