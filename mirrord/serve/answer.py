"""Writing an upstream's answer to the client: status, the headers that
cross, challenges pointed at our ``/token``, and the body relayed."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from mirrord.config import Timeouts
from mirrord.registry import errors
from mirrord.registry.challenges import RealmBook, rewrite_challenges
from mirrord.registry.headers import client_response_headers
from mirrord.registry.respond import API_VERSION, client_host, write_error
from mirrord.upstream.bodies import TransferIncomplete, discard_body, relay_body
from mirrord.upstream.chain import Answer

CACHE_HEADER = b"X-Mirrord-Cache"


def note_upstream(request: Request, answer: Answer) -> None:
    """Tell the access log which upstream answered and how."""
    record = getattr(request, "access", None)
    if record is not None:
        record.upstream = answer.upstream
        record.redirects = answer.redirects
        record.fell_back = answer.fell_back
    note_source(request, "upstream")


def note_source(request: Request, source: str) -> None:
    """Say where the body about to be written comes from (for metrics)."""
    record = getattr(request, "access", None)
    if record is not None:
        record.source = source


def note_cache(request: Request, status: str) -> None:
    request.setHeader(CACHE_HEADER, status.encode())
    record = getattr(request, "access", None)
    if record is not None:
        record.cache = status
    note_source(request, "upstream" if status == "MISS" else "cache")


def copy_headers(request: Request, answer: Answer, realms: RealmBook) -> None:
    """Status and the headers a registry client gets to see."""
    request.setResponseCode(answer.code)
    for name, values in client_response_headers(answer.headers):
        request.responseHeaders.setRawHeaders(name, values)
    request.setHeader(*API_VERSION)
    challenges = answer.headers.getRawHeaders(b"www-authenticate")
    if challenges:
        token_url = f"https://{client_host(request)}/token"
        request.responseHeaders.setRawHeaders(
            b"www-authenticate", rewrite_challenges(challenges, realms, token_url)
        )


async def write_answer(
    request: Request,
    answer: Answer,
    realms: RealmBook,
    clock: IReactorTime,
    timeouts: Timeouts,
) -> None:
    """Pass an upstream answer through to the client, body streamed."""
    note_upstream(request, answer)
    if answer.code == 416 and answer.body is None:
        # distribution 2.8 sends a short body with a whole-blob
        # Content-Length here: answer for it rather than relay it.
        discard_body(answer.response, clock, timeouts.body_idle)
        write_error(request, errors.range_invalid(request.getHeader(b"range") or ""))
        return
    copy_headers(request, answer, realms)
    if answer.body is not None:
        if request.method != b"HEAD":
            request.setHeader(b"Content-Length", b"%d" % len(answer.body))
        # A HEAD keeps the upstream's Content-Length: the length of what a
        # GET would send (containerd fails a manifest HEAD of length 0).
        request.write(answer.body)
        request.finish()
        return
    try:
        await relay_body(request, answer.response, clock, timeouts)
    except TransferIncomplete as e:
        record = getattr(request, "access", None)
        if record is not None:
            record.outcome = f"incomplete: {e}"
