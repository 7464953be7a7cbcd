"""The S3 circuit breaker on a task.Clock, and the client's deadline and
breaker wiring on a MemoryReactorClock (connections that never complete,
as a frozen S3 behaves): no real S3 needed for either."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from mirrord.store.s3 import Breaker, S3Client, S3Unavailable, pack_meta, unpack_meta


class BreakerTests(SynchronousTestCase):
    """Closed, open after N failures in a row, half-open with one trial."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.breaker = Breaker(self.clock, failures=3, reset_after=30.0)

    def fail_times(self, n: int) -> None:
        for _ in range(n):
            self.breaker.check()
            self.breaker.failure()

    def test_closed_lets_calls_through(self) -> None:
        """A new breaker is closed and lets every call through."""
        for _ in range(10):
            self.breaker.check()
        self.assertEqual(self.breaker.state, "closed")

    def test_opens_after_failures_in_a_row(self) -> None:
        """Two failures leave it closed; the third opens it and calls are refused."""
        self.fail_times(2)
        self.assertEqual(self.breaker.state, "closed")
        self.fail_times(1)
        self.assertEqual(self.breaker.state, "open")
        self.assertRaises(S3Unavailable, self.breaker.check)

    def test_success_resets_the_count(self) -> None:
        """Failures must be consecutive: a success in between starts the count again."""
        self.fail_times(2)
        self.breaker.success()
        self.fail_times(2)
        self.assertEqual(self.breaker.state, "closed")
        self.assertEqual(self.breaker.consecutive_failures, 2)

    def test_half_open_after_reset_lets_exactly_one_trial(self) -> None:
        """reset_after seconds after opening, one call goes through and the next is refused."""
        self.fail_times(3)
        self.clock.advance(29.9)
        self.assertEqual(self.breaker.state, "open")
        self.assertRaises(S3Unavailable, self.breaker.check)
        self.clock.advance(0.1)
        self.assertEqual(self.breaker.state, "half-open")
        self.breaker.check()
        self.assertRaises(S3Unavailable, self.breaker.check)

    def test_trial_success_closes(self) -> None:
        """A successful trial closes the breaker: every call goes through again."""
        self.fail_times(3)
        self.clock.advance(30)
        self.breaker.check()
        self.breaker.success()
        self.assertEqual(self.breaker.state, "closed")
        self.breaker.check()
        self.breaker.check()

    def test_trial_failure_reopens_for_another_period(self) -> None:
        """A failed trial opens it again for a full reset_after from then."""
        self.fail_times(3)
        self.clock.advance(30)
        self.breaker.check()
        self.breaker.failure()
        self.assertEqual(self.breaker.state, "open")
        self.clock.advance(29)
        self.assertRaises(S3Unavailable, self.breaker.check)
        self.clock.advance(1)
        self.assertEqual(self.breaker.state, "half-open")
        self.breaker.check()

    def test_released_trial_frees_the_slot(self) -> None:
        """A trial that was cancelled (release) lets the next caller be the trial."""
        self.fail_times(3)
        self.clock.advance(30)
        self.breaker.check()
        self.breaker.release()
        self.assertEqual(self.breaker.state, "half-open")
        self.breaker.check()
        self.assertRaises(S3Unavailable, self.breaker.check)

    def test_bad_settings_refused(self) -> None:
        """A threshold below one or a non-positive reset period is an error."""
        self.assertRaises(ValueError, Breaker, self.clock, failures=0)
        self.assertRaises(ValueError, Breaker, self.clock, reset_after=0)


class ClientDeadlineTests(SynchronousTestCase):
    """A client whose connections never complete: deadlines, then the breaker."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.breaker = Breaker(self.reactor, failures=3, reset_after=30.0)
        self.client = S3Client(
            self.reactor,
            "http://127.0.0.1:9",
            "bucket",
            "us-east-1",
            "AK",
            "SK",
            deadline=2.0,
            breaker=self.breaker,
        )

    def test_deadline_then_breaker_then_fail_fast(self) -> None:
        """Each call fails S3Unavailable at its deadline; after three the breaker
        refuses the fourth at once, without opening a connection."""
        for n in range(1, 4):
            d = self.client.head("k")
            self.assertNoResult(d)
            self.assertEqual(len(self.reactor.tcpClients), n)
            self.reactor.advance(1.9)
            self.assertNoResult(d)
            self.reactor.advance(0.1)
            self.failureResultOf(d, S3Unavailable)
        self.assertEqual(self.breaker.state, "open")
        self.failureResultOf(self.client.get_bytes("k", 100), S3Unavailable)
        self.assertEqual(len(self.reactor.tcpClients), 3, "an open breaker made a connection")
        self.assertEqual(self.client.requests, 3)

    def test_cancel_is_not_a_failure(self) -> None:
        """A call the caller cancels does not count against the breaker."""
        for _ in range(5):
            d = self.client.head("k")
            d.cancel()
            self.failureResultOf(d)
        self.assertEqual(self.breaker.state, "closed")
        self.assertEqual(self.breaker.consecutive_failures, 0)

    def test_bad_range_refused(self) -> None:
        """A range that ends before it starts, or an end without a start, is a ValueError."""
        self.assertRaises(ValueError, self.client.get, "k", 5, 4)
        self.assertRaises(ValueError, self.client.get, "k", None, 4)

    def test_metadata_must_be_ascii(self) -> None:
        """Non-ASCII metadata is refused before any I/O; pack_meta carries any JSON."""
        with self.assertRaises(ValueError):
            self.client.put_bytes("k", b"x", "text/plain", {"name": "caf\u00e9"})
        self.assertEqual(self.reactor.tcpClients, [])
        value = {"tag": "caf\u00e9", "n": [1, 2]}
        packed = pack_meta(value)
        self.assertTrue(packed.isascii())
        self.assertEqual(unpack_meta(packed), value)
        self.assertRaises(ValueError, unpack_meta, "not base64 json!")

    def test_presign_carries_expiry(self) -> None:
        """A presigned URL is path-style, names its expiry and carries a signature."""
        url = self.client.presign_get("a b/c", 60)
        self.assertTrue(url.startswith("http://127.0.0.1:9/bucket/a%20b/c?"), url)
        self.assertIn("X-Amz-Expires=60", url)
        self.assertIn("X-Amz-Signature=", url)
