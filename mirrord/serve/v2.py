"""The ``/v2/`` resource: parse, decide, ask upstream, stream the answer back.

The resource never touches the network itself: once a request is valid it
hands it to a ``Backend``: the upstream chain alone, or the pull-through
cache in front of it. When the client disconnects, that work is cancelled.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol as TypingProtocol
from urllib.parse import urlencode

from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mirrord.config import Registry, Timeouts
from mirrord.registry import errors, reference
from mirrord.registry.challenges import RealmBook
from mirrord.registry.headers import upstream_request_headers
from mirrord.registry.reference import Kind, Reference
from mirrord.registry.respond import client_address, write_error
from mirrord.registry.routing import Route, Router
from mirrord.serve.answer import write_answer
from mirrord.serve.clients import ClientAuth
from mirrord.upstream.chain import UpstreamChain
from mirrord.upstream.identity import as_mirror

log = Logger()

_RANGE_RE = re.compile(rb"bytes=(\d+-\d*|-\d+)")
ALLOWED_METHODS = (b"GET", b"HEAD")
PARSED_MAX = 1024
_ParseKey = tuple[str, bytes | None, bytes | None]  # path after /v2/, Host, ns


class Backend(TypingProtocol):
    """What answers a validated request: the upstream chain alone
    (``PassThrough``) or the cache in front of it (``PullThrough``)."""

    async def serve(
        self, request: Request, ref: Reference, name: str, path: str, headers: Headers
    ) -> None: ...

    def serve_now(
        self, request: Request, ref: Reference, name: str, path: str, headers: Callable[[], Headers]
    ) -> bool:
        """Answer at once if that needs no waiting (a cache hit this
        client may read); ``False`` when ``serve`` must, nothing written."""
        ...


@dataclass
class PassThrough:
    """Every request goes to the upstream chain; the answer streams back."""

    chain: UpstreamChain
    realms: RealmBook
    clock: IReactorTime
    timeouts: Timeouts

    async def serve(
        self, request: Request, ref: Reference, name: str, path: str, headers: Headers
    ) -> None:
        answer = await self.chain.request(request.method, path, headers)
        await write_answer(request, answer, self.realms, self.clock, self.timeouts)

    def serve_now(
        self, request: Request, ref: Reference, name: str, path: str, headers: Callable[[], Headers]
    ) -> bool:
        return False


def upstream_name(ref: Reference, registry: Registry) -> str:
    """Docker Hub serves official images under ``library/``."""
    if registry.official_prefix and ref.name and "/" not in ref.name:
        return f"{registry.official_prefix}/{ref.name}"
    return ref.name


def check_repository(registry: Registry, name: str) -> None:
    """A registry's ``allow`` and ``deny`` patterns (e.g. ``library/*``)."""
    if any(fnmatch.fnmatchcase(name, p) for p in registry.deny) or (
        registry.allow and not any(fnmatch.fnmatchcase(name, p) for p in registry.allow)
    ):
        raise errors.denied(f"repository {name!r} is not mirrored here")


# No blob is 10**18 bytes: a bound with more digits says "to the end" (last)
# or cannot be satisfied (first), and Python refuses int() past 4300 digits.
MAX_RANGE_DIGITS = 18


def check_range(values: list[bytes]) -> bytes:
    """The one ``bytes=`` range of a blob request, with absurd bounds made
    plain; anything else (several ranges or Range headers, bad syntax) is
    unsatisfiable here and never forwarded. Twisted already stripped the
    spaces and tabs around the value."""
    if len(values) != 1 or not _RANGE_RE.fullmatch(values[0]):
        raise errors.range_invalid(b", ".join(values).decode("latin-1"))
    first, _, last = values[0][6:].partition(b"-")
    first, last = first.lstrip(b"0") or first[:1], last.lstrip(b"0") or last[:1]
    if len(first) > MAX_RANGE_DIGITS:
        raise errors.range_invalid(values[0].decode("latin-1"))
    if not first and len(last) > MAX_RANGE_DIGITS:
        return b"bytes=0-"  # a suffix longer than any blob: all of it
    if len(last) > MAX_RANGE_DIGITS:
        last = b""
    if first and last and int(last) < int(first):
        raise errors.range_invalid(values[0].decode("latin-1"))
    return b"bytes=" + first + b"-" + last


class RegistryProxy(Resource):
    """Serves ``/v2/``: routes each request to a registry and its ``Backend``."""

    isLeaf = True

    def __init__(
        self,
        router: Router[Backend],
        count: Callable[[str], object] = lambda kind: None,
        clients: ClientAuth | None = None,
    ) -> None:
        super().__init__()
        self._router = router
        self._count = count  # each valid request, by kind, cache on or off
        self._clients = clients
        # Recent paths, routed and parsed (a pure function of the path, the
        # Host header and ``ns``): a cached manifest is asked for again and
        # again. Refusals are not kept; the table is emptied when full.
        self._parsed: dict[
            tuple[str, bytes | None, bytes | None], tuple[Route[Backend], Reference]
        ] = {}

    def render(self, request: Request) -> bytes | int:
        try:
            route, ref = self._parse(request)
        except errors.RegistryError as e:
            write_error(request, e)
            return NOT_DONE_YET
        # A cache hit is answered here, synchronously: no coroutine, no
        # Deferred, nothing to cancel (most of a cached manifest's cost
        # was that machinery). Anything that must wait takes ``_serve``.
        try:
            self._count(ref.kind.value)
            name = upstream_name(ref, route.registry)
            path = ref.path(name) + self._query(request, ref)
            # Built only if asked for: a hit on public content never is.
            built: list[Headers] = []

            def headers() -> Headers:
                if not built:
                    built.append(
                        upstream_request_headers(
                            request.requestHeaders, client_address(request), request.isSecure()
                        )
                    )
                return built[0]

            if self._serve_now(request, route, ref, name, path, headers):
                return NOT_DONE_YET
            upstream = headers()
        except Exception:
            self._failed(Failure(), request)
            return NOT_DONE_YET
        work = ensureDeferred(self._serve(request, route, ref, name, path, upstream))
        request.notifyFinish().addErrback(lambda _: work.cancel())
        work.addErrback(self._failed, request)
        return NOT_DONE_YET

    def _parse(self, request: Request) -> tuple[Route[Backend], Reference]:
        if request.method not in ALLOWED_METHODS:
            raise errors.unsupported_method(request.method.decode("latin-1"))
        try:
            rest = request.path[len(b"/v2/") :].decode("ascii")
        except UnicodeDecodeError:
            raise errors.name_invalid(request.path.decode("latin-1")) from None
        ns = request.args.get(b"ns", [None])[-1]
        host = request.getHeader(b"host")
        key = (rest, host, ns)
        parsed = self._parsed.get(key)
        if parsed is None:
            parsed = self._route(rest, host, ns)
            if len(self._parsed) >= PARSED_MAX:
                self._parsed.clear()
            self._parsed[key] = parsed
        route, ref = parsed
        if ref.kind is Kind.BLOB and request.requestHeaders.hasHeader(b"range"):
            # What the cache and the upstream see is the range as checked.
            checked = check_range(request.requestHeaders.getRawHeaders(b"range", []))
            request.requestHeaders.setRawHeaders(b"range", [checked])
        return route, ref

    def _serve_now(
        self,
        request: Request,
        route: Route[Backend],
        ref: Reference,
        name: str,
        path: str,
        headers: Callable[[], Headers],
    ) -> bool:
        if ref.kind is not Kind.MANIFEST:
            return False
        if self._clients is not None:
            admitted = self._clients.admit_now(request, route.registry.name, ref, name)
            if admitted is None:
                return False
            if admitted == "mirror":
                client = headers
                headers = lambda: as_mirror(client())  # noqa: E731
        return route.target.serve_now(request, ref, name, path, headers)

    def _route(
        self, rest: str, host: bytes | None, ns: bytes | None
    ) -> tuple[Route[Backend], Reference]:
        route = self._router.route(
            rest,
            host.decode("latin-1") if host else None,
            ns.decode("latin-1") if ns is not None else None,
        )
        ref = reference.parse(route.path)
        if ref.name:
            check_repository(route.registry, upstream_name(ref, route.registry))
        return route, ref

    async def _serve(
        self,
        request: Request,
        route: Route[Backend],
        ref: Reference,
        name: str,
        path: str,
        headers: Headers,
    ) -> None:
        if self._clients is not None:
            admitted = await self._clients.admit(request, route.registry.name, ref, name, headers)
            if admitted is None:
                return  # answered here: /v2/ itself, or a challenge
            headers = admitted
        await route.target.serve(request, ref, name, path, headers)

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

    def _failed(self, failure: Failure, request: Request) -> None:
        if failure.check(CancelledError):
            return None
        if failure.check(errors.RegistryError):
            write_error(request, failure.value)
            return None
        log.failure("proxying {path} failed", failure, path=request.path)
        write_error(request, errors.bad_gateway("internal error while proxying"))
        return None
