"""Log output: readable text on a terminal, one JSON object per line
otherwise (journald, files), with every structured field of the event.

Used by ``twistd --logger=mirrord.daemon.logs.observer``. In a worker
process (``workers`` > 1) every event carries ``worker`` (its index), and
the text form says ``worker=i``: the workers write to the supervisor's own
output, and a reader must tell them apart."""

from __future__ import annotations

import atexit
import json
import sys
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    formatEvent,
    formatEventAsClassicLogText,
    textFileLogObserver,
)
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

from mirrord.daemon.role import Role

# One encoder for every line: ``json.dumps(..., default=str)`` builds a
# new one per call.
_encoder = json.JSONEncoder(default=str)
_SKIPPED = frozenset(("format", "message", "time", "level", "namespace"))
# The values a line keeps: these (a set lookup first), or their subclasses.
_PLAIN_TYPES = (str, int, float, bool)
_PLAIN = frozenset((*_PLAIN_TYPES, type(None)))


def _message(event: dict[str, Any]) -> str:
    """The event's text. A format that is one field of text (the access
    event's ``{log_access_line}``) is that text: no formatter needed."""
    fmt = event.get("log_format")
    if isinstance(fmt, str) and fmt[:1] == "{" and fmt[-1:] == "}":
        text = event.get(fmt[1:-1])
        if isinstance(text, str):
            return text
    return formatEvent(event)


def _json_line(event: dict[str, Any], worker: int = 0) -> str:
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
        and (type(value) in _PLAIN or isinstance(value, _PLAIN_TYPES))
    )
    if worker:
        record["worker"] = worker
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return _encoder.encode(record) + "\n"


# A write of at most PIPE_BUF bytes to a pipe is never split or mixed with
# another process's: worker processes share the supervisor's output.
BATCH_LIMIT = 4096


def _reactor_later(call: Callable[[], None]) -> bool:
    """Run ``call`` on the reactor's next turn; ``False`` when it cannot
    (not running yet or any more, or not on the reactor's thread)."""
    # The reactor twistd installed before logging began, looked up per
    # batch rather than at import (no reactor at import time).
    from twisted.internet import reactor

    if not reactor.running or not isInIOThread():  # type: ignore[attr-defined]
        return False
    reactor.callLater(0, call)  # type: ignore[attr-defined]
    return True


class BatchedLines:
    """Whole lines to ``stream``, gathered while the reactor works and
    written (and flushed) once per reactor turn: under load one
    ``write`` system call per access event cost more than building the
    event. Each write is whole lines, at most ``BATCH_LIMIT`` bytes (the
    JSON lines are ASCII) unless one line alone is longer; what cannot be
    deferred (no running reactor, another thread) is written at once."""

    def __init__(
        self,
        stream: IO[str],
        later: Callable[[Callable[[], None]], bool] = _reactor_later,
        on_reactor_thread: Callable[[], bool] = isInIOThread,
    ) -> None:
        self._stream = stream
        self._later = later
        self._on_reactor_thread = on_reactor_thread
        self._lines: list[str] = []
        self._size = 0
        self._pending = False
        atexit.register(self.flush)

    def write(self, line: str) -> None:
        if not self._on_reactor_thread():
            self._stream.write(line)
            self._stream.flush()
            return
        if self._size + len(line) > BATCH_LIMIT:
            self.flush()
        self._lines.append(line)
        self._size += len(line)
        if self._size >= BATCH_LIMIT:
            self.flush()
        elif not self._pending:
            self._pending = self._later(self.flush)
            if not self._pending:
                self.flush()

    def flush(self) -> None:
        self._pending = False
        if self._lines:
            text, self._lines, self._size = "".join(self._lines), [], 0
            self._stream.write(text)
            self._stream.flush()


@implementer(ILogObserver)
class _LinesObserver:
    def __init__(self, lines: BatchedLines, render: Callable[[LogEvent], str]) -> None:
        self._lines = lines
        self._render = render

    def __call__(self, event: LogEvent) -> None:
        self._lines.write(self._render(event))


def json_lines_observer(
    stream: IO[str], worker: int = 0, lines: BatchedLines | None = None
) -> ILogObserver:
    return _LinesObserver(lines or BatchedLines(stream), lambda event: _json_line(event, worker))


def _worker_text(event: dict[str, Any], worker: int) -> str | None:
    level = getattr(event.get("log_level"), "name", "-")
    system = event.get("log_system") or f"{event.get('log_namespace', '-')}#{level}"
    return formatEventAsClassicLogText({**event, "log_system": f"{system} worker={worker}"})


def observer(stream: IO[str] | None = None, role: Role | None = None) -> ILogObserver:
    """Text when writing to a terminal, JSON lines when not."""
    stream = stream or sys.__stdout__
    worker = (role or Role.from_environ()).index
    if stream.isatty():
        if worker:
            return FileLogObserver(stream, lambda event: _worker_text(event, worker))
        return textFileLogObserver(stream)
    return json_lines_observer(stream, worker)
