"""The per-client counts shared by the workers of one host: two tables on
one file count as one, a full table still limits per worker, and a dead
worker's counts stop counting."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from mirrord.config import Access
from mirrord.front.clienttable import (
    CONNECTIONS,
    REQUESTS,
    ClientTable,
    SharedCounter,
    table_path,
)
from mirrord.front.guard import Guard, SharedFailedLogins
from mirrord.front.workershare import worker_gone
from tests.support.processes import REPO


class ClientTableTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.clock = Clock()

    def table(self, index: int, workers: int = 2, **kw: int) -> ClientTable:
        table = ClientTable(table_path(self.dir), workers, index, self.clock.seconds, **kw)
        self.addCleanup(table.close)
        return table

    def test_two_tables_on_one_file_count_as_one(self) -> None:
        """Connections counted by two workers are one total that either of them reads."""
        one, two = self.table(1), self.table(2)
        one.add("192.0.2.1", CONNECTIONS, 1)
        two.add("192.0.2.1", CONNECTIONS, 1)
        two.add("192.0.2.1", CONNECTIONS, 1)
        two.add("192.0.2.9", REQUESTS, 1)
        self.assertEqual(one.total("192.0.2.1", CONNECTIONS), 3)
        self.assertEqual(two.total("192.0.2.1", CONNECTIONS), 3)
        self.assertEqual(one.total("192.0.2.1", REQUESTS), 0)
        self.assertEqual(one.total("192.0.2.9", REQUESTS), 1)
        two.add("192.0.2.1", CONNECTIONS, -1)
        self.assertEqual(one.total("192.0.2.1", CONNECTIONS), 2)

    def guards(self, access: Access) -> tuple[Guard, Guard]:
        return (
            Guard(access, now=self.clock.seconds, table=self.table(1)),
            Guard(access, now=self.clock.seconds, table=self.table(2)),
        )

    def refused(self, guard: Guard, client: str = "192.0.2.1") -> int | None:
        """The status ``guard`` answers a new request from ``client`` with (None: admitted)."""
        refusal = guard.check(DummyRequest([b"v2", b""]), client, client)
        return refusal.status if refusal is not None else None

    def test_connection_limit_holds_across_workers(self) -> None:
        """With max_connections_per_client = 2, a third connection in either worker is over."""
        one, two = self.guards(Access(max_connections_per_client=2))
        one.connection_made("192.0.2.1")
        two.connection_made("192.0.2.1")
        self.assertIsNone(self.refused(one))  # its own connection is one of the two
        two.connection_made("192.0.2.1")
        self.assertEqual(self.refused(one), 429)
        self.assertIsNone(self.refused(one, "192.0.2.2"))  # other clients are not touched
        two.connection_lost("192.0.2.1")
        self.assertIsNone(self.refused(one))

    def test_request_limit_holds_across_workers(self) -> None:
        """With max_requests_per_client = 2, requests in flight in both workers count together."""
        one, two = self.guards(Access(max_requests_per_client=2))
        one.requests.add("192.0.2.1")
        self.assertIsNone(self.refused(two))
        two.requests.add("192.0.2.1")
        self.assertEqual(self.refused(one), 429)
        self.assertEqual(self.refused(two), 429)
        one.requests.remove("192.0.2.1")
        self.assertIsNone(self.refused(two))

    def test_failed_logins_count_across_workers(self) -> None:
        """Failures in one worker refuse the address in the other, for the window."""
        one = SharedFailedLogins(3, 60, self.clock.seconds, self.table(1))
        two = SharedFailedLogins(3, 60, self.clock.seconds, self.table(2))
        one.failed("2001:db8::1")
        two.failed("2001:db8::2")  # the same /64
        self.assertIsNone(one.refused_for("2001:db8::3", b"x"))
        one.failed("2001:db8::1")
        self.clock.advance(10)
        self.assertEqual(two.refused_for("2001:db8::9"), 50)
        self.assertIsNone(two.refused_for("2001:db8:1::1"))  # another /64
        self.assertEqual(len(two), 1)
        self.clock.advance(50)
        self.assertIsNone(one.refused_for("2001:db8::1"))
        self.assertEqual(len(one), 0)

    def test_checks_under_way_count_across_workers(self) -> None:
        """Credentials being checked in one worker count as guesses to come in the other."""
        one = SharedFailedLogins(2, 60, self.clock.seconds, self.table(1))
        two = SharedFailedLogins(2, 60, self.clock.seconds, self.table(2))
        one.checking("192.0.2.1", b"guess1")
        two.checking("192.0.2.1", b"guess2")
        self.assertEqual(one.refused_for("192.0.2.1", b"guess3"), 1)
        self.assertIsNone(one.refused_for("192.0.2.1", b"guess1"))  # waits for its check
        two.checked("192.0.2.1", b"guess2")
        self.assertIsNone(one.refused_for("192.0.2.1", b"guess3"))

    def test_full_table_counts_in_the_worker(self) -> None:
        """A client the table has no room for is still counted, in its worker's memory."""
        one = self.table(1, slots=2, probes=2)
        self.assertTrue(one.add("a", CONNECTIONS, 1))
        self.assertTrue(one.add("b", CONNECTIONS, 1))
        self.assertFalse(one.add("c", CONNECTIONS, 1))
        counter = SharedCounter(one, CONNECTIONS)
        counter.add("c")
        counter.add("c")
        self.assertEqual(counter["c"], 2)
        counter.remove("c")
        self.assertEqual(counter["c"], 1)
        # A slot whose counts are back to nothing is taken by the next client.
        one.add("a", CONNECTIONS, -1)
        self.assertTrue(one.add("d", CONNECTIONS, 1))
        self.assertEqual(one.total("a", CONNECTIONS), 0)
        self.assertEqual(one.total("d", CONNECTIONS), 1)

    def test_failure_records_hold_their_slot_until_they_end(self) -> None:
        """A failed-login record keeps its slot for its window, then frees it."""
        one = self.table(1, slots=1, probes=1)
        self.assertTrue(one.failed("a", 3, 60))
        self.assertFalse(one.add("b", CONNECTIONS, 1))
        self.clock.advance(61)
        self.assertTrue(one.add("b", CONNECTIONS, 1))

    def test_dead_worker_is_cleared(self) -> None:
        """The supervisor's call for a dead worker forgets its connections and requests only."""
        one, two = self.table(1, slots=64, probes=4), self.table(2, slots=64, probes=4)
        one.add("192.0.2.1", CONNECTIONS, 1)
        two.add("192.0.2.1", CONNECTIONS, 5)
        two.add("192.0.2.1", REQUESTS, 2)
        worker_gone(2, 12345, self.dir)
        self.assertEqual(one.total("192.0.2.1", CONNECTIONS), 1)
        self.assertEqual(one.total("192.0.2.1", REQUESTS), 0)

    def test_restarted_worker_starts_from_nothing(self) -> None:
        """The worker started in a dead one's place clears the dead one's counts as it opens."""
        one, two = self.table(1), self.table(2)
        two.add("192.0.2.1", CONNECTIONS, 4)
        one.failed("192.0.2.1", 3, 60)
        self.table(2)
        self.assertEqual(one.total("192.0.2.1", CONNECTIONS), 0)
        self.assertEqual(one.failures("192.0.2.1"), (1, 60.0))  # failures are the host's

    def test_two_processes_never_share_a_slot(self) -> None:
        """Two real workers taking and freeing slots at once: each client reads back its count."""
        path = table_path(self.dir)
        # Made before they start, as the supervisor's first worker would.
        ClientTable(path, 2, 1, self.clock.seconds, slots=64, probes=16).close()
        start = str(time.time() + 3)  # both ready by then, on a busy machine too
        workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.support.tableworker",
                    str(path),
                    str(i),
                    p,
                    start,
                    "1",
                ],
                stdout=subprocess.PIPE,
                cwd=REPO,
            )
            for i, p in ((1, "a"), (2, "b"))
        ]
        for worker in workers:
            out, _ = worker.communicate(timeout=120)
            self.assertEqual((worker.returncode, out.strip()), (0, b"0"))

    def test_another_geometry_is_refused(self) -> None:
        """A table file made for another number of workers is not misread."""
        self.table(1, workers=2, slots=32, probes=2)
        with self.assertRaises(ValueError):
            self.table(1, workers=5, slots=16, probes=2)  # the same size of file
