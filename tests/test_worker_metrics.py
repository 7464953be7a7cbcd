"""Metrics stay one stream with worker processes: whichever worker reads
them (for ``/metrics``, the status page's totals) sees the sums of all
workers, and a dead worker's fills in progress stop counting. Real
processes, since prometheus_client picks its per-process files at import."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mirrord.front.workershare import worker_gone
from mirrord.metrics import Metrics
from mirrord.metricsarchive import locked
from tests.support.processes import REPO


def samples(exposition: str) -> dict[str, float]:
    return {
        name: float(value)
        for name, value in re.findall(r"(?m)^([a-z_]+(?:\{[^}]*\})?) (\S+)$", exposition)
    }


class WorkerMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.shared = Path(tempfile.mkdtemp())
        self.dir = self.shared / "metrics"
        self.env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}

    def worker(self, *args: str, env: dict[str, str] | None = None) -> dict:
        done = subprocess.run(
            [sys.executable, "-m", "tests.support.metricsworker", str(self.dir), *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env=env or self.env,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        return json.loads(done.stdout)

    def test_any_worker_reads_the_sums_of_all(self) -> None:
        """Counters, fills and the cache gauges read the same, summed, in any worker."""
        self.worker("count", "blobs", "3", "2", "90")
        # The second worker as the supervisor starts it: the directory set
        # before prometheus_client is imported.
        self.worker(
            "count",
            "blobs",
            "4",
            "1",
            "80",
            env={**self.env, "PROMETHEUS_MULTIPROC_DIR": str(self.dir)},
        )
        read = self.worker("read")
        found = samples(read["exposition"])
        self.assertEqual(found['mirrord_requests_total{kind="blobs"}'], 7)
        self.assertEqual(found['mirrord_served_bytes_total{source="cache"}'], 700)
        self.assertEqual(found["mirrord_fills_in_progress"], 3)
        self.assertEqual(found["mirrord_cache_size_bytes"], 1000)
        self.assertEqual(found["mirrord_cache_entries"], 2)
        self.assertEqual(found["mirrord_cache_limit_bytes"], 5000)
        # Each family once, without the pid label or _created samples.
        self.assertEqual(read["exposition"].count("# TYPE mirrord_fills_in_progress "), 1)
        self.assertNotIn("pid=", read["exposition"])
        self.assertNotIn("_created", read["exposition"])
        # The status page's totals are the same sums.
        self.assertEqual((read["hits"], read["cache_bytes"]), (7, 700))
        self.assertIn("<td>3</td>", read["fills"])

    def test_quota_is_the_most_recent_answer(self) -> None:
        """The remaining-pulls gauge is the last value any worker saw, not a sum."""
        self.worker("count", "blobs", "1", "0", "90")
        time.sleep(0.01)  # the gauge's timestamps order the workers' writes
        self.worker("count", "blobs", "1", "0", "75")
        read = self.worker("read")
        found = samples(read["exposition"])
        self.assertEqual(
            found['mirrord_upstream_ratelimit_remaining{identity="anonymous",upstream="hub"}'], 75
        )
        # The status page of a worker that saw no answer itself says so too.
        self.assertIn("pulls left for anonymous: 75", read["upstreams"])

    def test_dead_worker_fills_stop_counting(self) -> None:
        """worker_gone drops a dead worker's fills in progress; its counters stay."""
        first = self.worker("count", "blobs", "3", "2", "90")["pid"]
        self.worker("count", "blobs", "4", "1", "80")
        worker_gone(1, first, self.shared)
        found = samples(self.worker("read")["exposition"])
        self.assertEqual(found["mirrord_fills_in_progress"], 1)
        self.assertEqual(found['mirrord_requests_total{kind="blobs"}'], 7)

    def test_dead_workers_files_are_merged_keeping_the_totals(self) -> None:
        """Each dead worker's counters move into one archive: every total reads the same
        before and after the deaths (fills aside), and the metric files do not grow
        with the number of dead workers."""
        dead = [self.worker("count", "blobs", str(n), "1", "90")["pid"] for n in (1, 2, 3, 4)]
        time.sleep(0.01)  # the live worker's quota is the most recent
        self.worker("count", "tags", "5", "2", "75")
        before = samples(self.worker("read")["exposition"])
        worker_gone(1, dead[0], self.shared)
        files_after_one = sorted(p.name for p in self.dir.iterdir())
        for pid in dead[1:]:
            worker_gone(1, pid, self.shared)
        files = sorted(p.name for p in self.dir.iterdir())
        # More deaths add no file: the archive is the one file per kind.
        self.assertLessEqual(set(files), set(files_after_one))
        self.assertFalse([name for name in files if any(f"_{pid}." in name for pid in dead)])
        after = samples(self.worker("read")["exposition"])
        self.assertEqual(after["mirrord_fills_in_progress"], 2)
        self.assertEqual(after, {**before, "mirrord_fills_in_progress": 2})
        self.assertEqual(after['mirrord_requests_total{kind="blobs"}'], 10)
        self.assertEqual(
            after['mirrord_upstream_ratelimit_remaining{identity="anonymous",upstream="hub"}'], 75
        )

    def test_a_read_waits_while_an_archive_is_swapped_in(self) -> None:
        """A worker reading the metrics waits while the supervisor swaps a dead worker's
        files for the archive, so no read counts them twice or not at all."""
        self.worker("count", "blobs", "1", "0", "90")
        with locked(self.dir, fcntl.LOCK_EX):
            reader = subprocess.Popen(
                [sys.executable, "-m", "tests.support.metricsworker", str(self.dir), "read"],
                stdout=subprocess.PIPE,
                cwd=REPO,
                env=self.env,
            )
            self.addCleanup(reader.kill)
            time.sleep(2)  # a read that did not wait would have ended
            self.assertIsNone(reader.poll())
        out, _ = reader.communicate(timeout=60)
        found = samples(json.loads(out)["exposition"])
        self.assertEqual(found['mirrord_requests_total{kind="blobs"}'], 1)

    def test_one_process_keeps_its_own_registry(self) -> None:
        """Without workers each Metrics counts alone, as before: nothing is shared."""
        one, two = Metrics(), Metrics()
        one.requests.labels("blobs").inc()
        self.assertEqual(one.value("mirrord_requests_total", kind="blobs"), 1)
        self.assertEqual(two.value("mirrord_requests_total", kind="blobs"), 0)
        self.assertFalse(one.shared)
