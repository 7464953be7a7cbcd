"""Log output: readable text on a terminal, one JSON object per line
otherwise (journald, files), with every structured field of the event.

Used by ``twistd --logger=mirrord.daemon.logs.observer``. In a worker
process (``workers`` > 1) every event carries ``worker`` (its index), and
the text form says ``worker=i``: the workers write to the supervisor's own
output, and a reader must tell them apart."""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    formatEvent,
    formatEventAsClassicLogText,
    textFileLogObserver,
)

from mirrord.daemon.role import Role


def _json_line(event: dict[str, Any], worker: int = 0) -> str:
    record: dict[str, Any] = {
        "time": event.get("log_time"),
        "level": getattr(event.get("log_level"), "name", None),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in record or key in ("format", "message", "time"):
            continue
        if isinstance(value, str | int | float | bool) or value is None:
            record[key] = value
    if worker:
        record["worker"] = worker
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, default=str) + "\n"


def json_lines_observer(stream: IO[str], worker: int = 0) -> FileLogObserver:
    return FileLogObserver(stream, lambda event: _json_line(event, worker))


def _worker_text(event: dict[str, Any], worker: int) -> str | None:
    level = getattr(event.get("log_level"), "name", "-")
    system = event.get("log_system") or f"{event.get('log_namespace', '-')}#{level}"
    return formatEventAsClassicLogText({**event, "log_system": f"{system} worker={worker}"})


def observer(stream: IO[str] | None = None, role: Role | None = None) -> FileLogObserver:
    """Text when writing to a terminal, JSON lines when not."""
    stream = stream or sys.__stdout__
    worker = (role or Role.from_environ()).index
    if stream.isatty():
        if worker:
            return FileLogObserver(stream, lambda event: _worker_text(event, worker))
        return textFileLogObserver(stream)
    return json_lines_observer(stream, worker)
