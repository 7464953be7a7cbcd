"""A stand-in for the reactor thread when testing the disk worker."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any


class ThreadedReactor:
    """Just enough reactor for the worker: callFromThread queues calls that
    the test runs on its own thread, as the reactor loop would, so the test
    decides when the reactor hears from the worker."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.Queue()
        self.main = threading.get_ident()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.calls.put((f, args))

    def run_until(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        while not done():
            f, args = self.calls.get(timeout=timeout)
            assert threading.get_ident() == self.main
            f(*args)

    def run_one(self, timeout: float = 10.0) -> None:
        f, args = self.calls.get(timeout=timeout)
        f(*args)
