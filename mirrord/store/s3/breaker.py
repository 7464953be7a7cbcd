"""A circuit breaker: after repeated failures, fail fast instead of waiting.

A frozen S3 does not refuse connections, it hangs (a stopped Ceph OSD
leaves RGW accepting requests it never answers, see FLEET.md), so every
call would cost a client its whole deadline. After ``failures`` failures
in a row the breaker opens and ``check`` refuses at once, with no network
I/O, so the daemon turns to its local tier and the upstream without
waiting. After ``reset_after`` seconds it is half-open: exactly one trial
call goes through; its success closes the breaker, its failure opens it
for another ``reset_after``.

The state is computed from the injected clock when asked, so the breaker
holds no timers (nothing to cancel at shutdown, and a ``task.Clock``
drives it in tests).
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


class S3Unavailable(Exception):
    """S3 cannot be used now: a deadline passed, a connection failed, the
    server answered 5xx, or the breaker is open. The caller falls back."""


class Breaker:
    """Counts consecutive failures of one service and opens after ``failures``."""

    log = Logger()

    def __init__(self, clock: IReactorTime, failures: int = 3, reset_after: float = 30.0) -> None:
        if failures < 1 or reset_after <= 0:
            raise ValueError("failures must be at least 1 and reset_after positive")
        self._clock = clock
        self.failures = failures
        self.reset_after = reset_after
        self._count = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open``."""
        if self._opened_at is None:
            return "closed"
        if self._clock.seconds() - self._opened_at < self.reset_after:
            return "open"
        return "half-open"

    @property
    def consecutive_failures(self) -> int:
        """Failures since the last success (for metrics)."""
        return self._count

    def check(self) -> None:
        """Raise ``S3Unavailable`` unless a call may go ahead now.

        Closed: always. Open: never. Half-open: the first caller becomes the
        trial and goes ahead; the others are refused until it reports."""
        state = self.state
        if state == "closed":
            return
        if state == "half-open" and not self._trial:
            self._trial = True
            return
        raise S3Unavailable(f"circuit breaker {state}")

    def success(self) -> None:
        """The call got an answer from the service: close the breaker."""
        if self._opened_at is not None:
            self.log.info("S3 breaker closed after a successful trial")
        self._count = 0
        self._opened_at = None
        self._trial = False

    def failure(self) -> None:
        """The call failed for want of the service: count it, and open the
        breaker at the threshold (or again, when it was the trial)."""
        self._count += 1
        if self._trial or (self._opened_at is None and self._count >= self.failures):
            self.log.warn(
                "S3 breaker open for {seconds}s after {count} failures",
                seconds=self.reset_after,
                count=self._count,
            )
            self._opened_at = self._clock.seconds()
        self._trial = False

    def release(self) -> None:
        """The call ended without telling anything about the service (the
        caller cancelled it): free the half-open trial slot, if it held it."""
        self._trial = False
