"""One structured access event per request, however the request ended."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.logger import Logger

log = Logger(namespace="mirrord.access")


@dataclass
class AccessRecord:
    """What the proxy learned while serving a request, for the access event."""

    started: float
    upstream: str = ""
    redirects: int = 0
    fell_back: bool = False
    outcome: str = "ok"
    cache: str = "-"


def emit(
    *,
    client: str,
    method: str,
    path: str,
    status: int,
    sent: int,
    duration: float,
    record: AccessRecord,
) -> None:
    log.info(
        "{client} {method} {path} -> {status} bytes={bytes} {duration_ms:.1f}ms"
        " upstream={upstream} redirects={redirects} fallback={fallback} cache={cache}"
        " {outcome}",
        client=client,
        method=method,
        path=path,
        status=status,
        bytes=sent,
        duration_ms=duration * 1000,
        upstream=record.upstream or "-",
        redirects=record.redirects,
        fallback=record.fell_back,
        cache=record.cache,
        outcome=record.outcome,
    )
