"""Log output: readable text on a terminal, one JSON object per line
otherwise (journald, files), with every structured field of the event.

Used by ``twistd --logger=mirrord.daemon.logs.observer``."""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from twisted.logger import FileLogObserver, formatEvent, textFileLogObserver

# One encoder for every line: ``json.dumps(..., default=str)`` builds a
# new one per call.
_encoder = json.JSONEncoder(default=str)
_SKIPPED = frozenset(("format", "message", "time", "level", "namespace"))


def _message(event: dict[str, Any]) -> str:
    """The event's text. A format that is one field of text (the access
    event's ``{log_access_line}``) is that text: no formatter needed."""
    fmt = event.get("log_format")
    if isinstance(fmt, str) and fmt[:1] == "{" and fmt[-1:] == "}":
        text = event.get(fmt[1:-1])
        if isinstance(text, str):
            return text
    return formatEvent(event)


def _json_line(event: dict[str, Any]) -> str:
    record: dict[str, Any] = {
        "time": event.get("log_time"),
        "level": getattr(event.get("log_level"), "name", None),
        "namespace": event.get("log_namespace"),
        "message": _message(event),
    }
    record.update(
        (key, value)
        for key, value in event.items()
        if not key.startswith("log_")
        and key not in _SKIPPED
        and (value is None or isinstance(value, str | int | float | bool))
    )
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return _encoder.encode(record) + "\n"


def json_lines_observer(stream: IO[str]) -> FileLogObserver:
    return FileLogObserver(stream, _json_line)


def observer(stream: IO[str] | None = None) -> FileLogObserver:
    """Text when writing to a terminal, JSON lines when not."""
    stream = stream or sys.__stdout__
    if stream.isatty():
        return textFileLogObserver(stream)
    return json_lines_observer(stream)
