"""One structured access event per request, however the request ended."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from twisted.logger import Logger, LogLevel

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
    # Where the body's bytes come from ("cache" or "upstream"): counted
    # in the served-bytes metric as they are written.
    source: str = ""


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
    # Every field stays in the event (the JSON log has them all); the text
    # is rendered here, once, with an f-string: an observer formatting a
    # format string of eleven fields cost more than the rest of a cached
    # manifest's answer (measured with cProfile). Its key starts with
    # ``log_`` so that the JSON lines do not carry the message twice.
    #
    # The event is the dict ``log.info`` would build, handed to the logger's
    # observer directly: ``Logger.emit`` first checks the level against
    # every ``LogLevel`` constant, a few microseconds of each request.
    upstream = record.upstream or "-"
    duration_ms = duration * 1000
    log.observer(
        {
            "log_access_line": f"{client} {method} {path} -> {status} bytes={sent}"
            f" {duration_ms:.1f}ms upstream={upstream} redirects={record.redirects}"
            f" fallback={record.fell_back} cache={record.cache} {record.outcome}",
            "client": client,
            "method": method,
            "path": path,
            "status": status,
            "bytes": sent,
            "duration_ms": duration_ms,
            "upstream": upstream,
            "redirects": record.redirects,
            "fallback": record.fell_back,
            "cache": record.cache,
            "outcome": record.outcome,
            "log_logger": log,
            "log_level": LogLevel.info,
            "log_namespace": log.namespace,
            "log_source": None,
            "log_format": "{log_access_line}",
            "log_time": time.time(),
        }
    )


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class CombinedLog:
    """An access log file in nginx's "combined" format, for existing log
    tools; ``reopen()`` (on SIGUSR1) follows logrotate's rename."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] = self._open()

    def _open(self) -> IO[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self.path.open("a", buffering=1, encoding="utf-8", errors="replace")

    def reopen(self) -> None:
        old, self._file = self._file, self._open()
        old.close()

    def write(
        self,
        *,
        client: str,
        request_line: str,
        status: int,
        sent: int,
        referer: str,
        agent: str,
        when: float,
    ) -> None:
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(when))
        self._file.write(
            f"{client} - - [{stamp}] {_quoted(request_line)} {status} {sent} "
            f"{_quoted(referer or '-')} {_quoted(agent or '-')}\n"
        )

    def close(self) -> None:
        self._file.close()
