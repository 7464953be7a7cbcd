"""Log output: readable text on a terminal, one JSON object per line
otherwise (journald, files), with every structured field of the event.

Used by ``twistd --logger=mirrord.daemon.logs.observer``."""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from twisted.logger import FileLogObserver, formatEvent, textFileLogObserver


def _json_line(event: dict[str, Any]) -> str:
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
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, default=str) + "\n"


def json_lines_observer(stream: IO[str]) -> FileLogObserver:
    return FileLogObserver(stream, _json_line)


def observer(stream: IO[str] | None = None) -> FileLogObserver:
    """Text when writing to a terminal, JSON lines when not."""
    stream = stream or sys.__stdout__
    if stream.isatty():
        return textFileLogObserver(stream)
    return json_lines_observer(stream)
