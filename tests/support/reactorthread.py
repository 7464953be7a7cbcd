"""The global reactor in a thread of its own, for tests of Twisted-native
clients against real servers (S3, Redis): each call is handed to the
reactor thread and waited for with a bound."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.python.failure import Failure

WAIT = 60.0  # bound on any one call seen from the test thread


def running_reactor() -> Iterator[Any]:
    """The global reactor, running in a thread until the generator is
    closed (then stopped, which also stops the clients' thread pools)."""
    from twisted.internet import reactor as global_reactor

    assert not global_reactor.running, "another test runs the global reactor"
    thread = threading.Thread(
        target=global_reactor.run,
        kwargs={"installSignalHandlers": False},
        name="reactor",
        daemon=True,
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not global_reactor.running:
        assert time.monotonic() < deadline, "the reactor did not start"
        time.sleep(0.01)
    yield global_reactor
    global_reactor.callFromThread(global_reactor.stop)
    thread.join(10)


def call(reactor: Any, f: Callable[..., Any], *args: Any, timeout: float = WAIT) -> Any:
    """Run ``f(*args)`` on the reactor thread and wait (bounded) for its result."""
    done = threading.Event()
    box: list[Any] = []

    def start() -> None:
        def finished(result: Any) -> None:
            box.append(result)
            done.set()

        maybeDeferred(f, *args).addBoth(finished)

    reactor.callFromThread(start)
    assert done.wait(timeout), f"{f!r} took more than {timeout} s"
    result = box[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result
