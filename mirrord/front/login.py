"""Mirror login: HTTP basic auth against salted scrypt hashes in the
configuration, coexisting with the upstreams' bearer tokens.

With ``[access.users]`` set, every ``/v2/`` and ``/token`` request needs
either the mirror's basic credentials (stripped before anything goes
upstream: they are the mirror's, not the upstream's) or a bearer token that
``/token`` handed to a logged-in client. A client without either gets 401
with ``WWW-Authenticate: Basic``; Docker, containerd and podman then send
the credentials of ``docker login <mirror>``.

Checking a password costs scrypt about 50 ms of CPU and 16 MiB, on purpose.
That work runs in a ``LoginWorker``'s thread, never on the reactor: a stream
of wrong passwords would otherwise stall every transfer. The worker takes a
bounded number of checks (queued and running); past that a check is refused
at once (``LoginBusy``) instead of queueing work and memory without bound.

Hashes are made and checked by ``mirrord.passwords``.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mirrord.expiring import Expiring
from mirrord.passwords import check_hash, make_hash

# One thread: on a small machine the other core stays the reactor's however
# many wrong passwords arrive. Eight checks at most, queued and running: a
# client waits at most about 8 x 50 ms for its answer, never longer.
LOGIN_THREADS = 1
MAX_CHECKS = 8

# Runs a password check somewhere and says how it went.
Runner = Callable[[Callable[[], bool]], "Deferred[bool]"]


def _refuse_after(check: Callable[[str, str], bool], password: str, stored: str) -> bool:
    check(password, stored)
    return False


class LoginBusy(Exception):
    """Too many password checks are waiting already: refused, not queued."""


def run_inline(check: Callable[[], bool]) -> Deferred[bool]:
    """Checks on the caller's thread: for tests on a Clock, never the daemon."""
    return maybeDeferred(check)


class LoginWorker(Service):
    """The threads that check passwords, with a bounded queue.

    The daemon stops it after its transfers drained; ``ThreadPool.stop``
    still runs the checks queued then. ``pool`` and ``reactor`` (anything
    with ``callFromThread``) are injectable so tests can hold or step them.
    """

    name = "login worker"

    def __init__(
        self,
        reactor: Any,
        threads: int = LOGIN_THREADS,
        max_checks: int = MAX_CHECKS,
        pool: Any = None,
    ) -> None:
        self.reactor = reactor
        self.pool = pool or ThreadPool(minthreads=0, maxthreads=threads, name="mirrord-login")
        self.max_checks = max_checks
        self.checks = 0  # queued or running: a slot is free once its thread is done

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()

    def run(self, check: Callable[[], bool]) -> Deferred[bool]:
        """``check()`` in a worker thread. Cancelling skips it if it has not
        started yet (its slot is then free as soon as a thread reaches it)."""
        if not self.running:
            return fail(LoginBusy("the login worker is not running"))
        if self.checks >= self.max_checks:
            return fail(LoginBusy(f"{self.checks} password checks waiting already"))
        self.checks += 1
        cancelled: list[bool] = []
        result: Deferred[bool] = Deferred(lambda _: cancelled.append(True))

        def work() -> bool | None:
            return None if cancelled else check()

        def done(success: bool, value: object) -> None:
            self.reactor.callFromThread(self._done, result, success, value)

        self.pool.callInThreadWithCallback(done, work)
        return result

    def _done(self, result: Deferred[bool], success: bool, value: Any) -> None:
        self.checks -= 1
        if result.called:  # cancelled: the client left
            return
        if success:
            result.callback(value)
        else:
            result.errback(value)


class _SharedCheck:
    """One check of one header, and the requests waiting for its answer."""

    def __init__(self) -> None:
        self.waiters: list[Deferred[bool]] = []
        self.work: Deferred[bool] | None = None


class MirrorLogin:
    """Checks credentials, remembering answers for a while: scrypt is slow on
    purpose, and a pull makes hundreds of requests. Requests that bring the
    same credentials while they are being checked wait for the same check."""

    def __init__(
        self,
        users: Mapping[str, str],
        now: Callable[[], float],
        ttl: float = 300.0,
        run: Runner = run_inline,
    ) -> None:
        self.users = users
        self._ttl = ttl
        self._run = run
        self._answers: Expiring[bytes, bool] = Expiring(now)
        self._checking: dict[bytes, _SharedCheck] = {}
        # An unknown user costs the same scrypt as a known one, so the time
        # of a refusal does not tell which user names exist.
        self._decoy = make_hash(os.urandom(16).hex()) if users else ""

    @property
    def enabled(self) -> bool:
        return bool(self.users)

    def known(self, header: bytes) -> bool | None:
        """The remembered answer for a ``Basic`` header, if there is one."""
        return self._answers.get(hashlib.sha256(header).digest())

    def check(self, header: bytes) -> Deferred[bool]:
        """Whether a ``Basic`` header's credentials are right. Fails with
        ``LoginBusy`` when the worker is full; cancelling leaves the check
        (which stops once nobody waits for it)."""
        key = hashlib.sha256(header).digest()
        shared = self._checking.get(key)
        if shared is None:
            shared = _SharedCheck()
        waiter: Deferred[bool] = Deferred(lambda w: self._leave(key, shared, w))
        shared.waiters.append(waiter)
        if shared.work is None:
            self._checking[key] = shared
            shared.work = self._start(header)
            shared.work.addBoth(self._checked, key, shared)
        return waiter

    def _start(self, header: bytes) -> Deferred[bool]:
        known = self.known(header)
        if known is not None:
            return succeed(known)
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return succeed(False)
        if not user:
            return succeed(False)  # not a name anyone could have
        stored = self.users.get(user)
        if stored is None:
            return self._run(partial(_refuse_after, check_hash, password, self._decoy))
        return self._run(partial(check_hash, password, stored))

    def _checked(self, outcome: bool | Failure, key: bytes, shared: _SharedCheck) -> None:
        if self._checking.get(key) is shared:
            del self._checking[key]
        waiters, shared.waiters = shared.waiters, []
        if isinstance(outcome, Failure):
            # Cancelled only once nobody waited (see _leave): then this is no one.
            for waiter in waiters:
                waiter.errback(outcome)
            return None
        self._answers.put(key, outcome, self._ttl)
        for waiter in waiters:
            waiter.callback(outcome)
        return None

    def _leave(self, key: bytes, shared: _SharedCheck, waiter: Deferred[bool]) -> None:
        if waiter in shared.waiters:
            shared.waiters.remove(waiter)
        if not shared.waiters and shared.work is not None and not shared.work.called:
            if self._checking.get(key) is shared:
                del self._checking[key]
            shared.work.cancel()
