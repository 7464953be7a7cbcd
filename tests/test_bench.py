"""The benchmark's own logic: reading what wrk, ab and curl print, the
statistics over rounds, the rows' arithmetic, the machine description,
the round order, the bare ceiling site and the /proc reading. A mistake
in any of these makes every figure of bench/results.md quietly wrong."""

from __future__ import annotations

import subprocess
import sys
import time

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from bench import machine, procs, rows, stats, tools
from bench.bare_site import SameBytes
from bench.run import rotated

WRK_OK = """\
Running 2s test @ https://127.0.0.1:18443/x
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.05ms    1.03ms  10.00ms   80.98%
    Req/Sec     1.97k   317.95     2.88k    80.00%
  7891 requests in 2.01s, 1.89MB read
Requests/sec:   3935.45
Transfer/sec:      0.94MB
"""

WRK_404 = """\
Running 1s test @ http://127.0.0.1:18080/missing
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.61ms    2.42ms  16.99ms   86.35%
    Req/Sec     0.86k   104.17     1.02k    80.00%
  863 requests in 1.01s, 438.42KB read
  Non-2xx or 3xx responses: 863
Requests/sec:    856.34
Transfer/sec:    435.04KB
"""

AB_HEAD = """\
Server Software:        TwistedWeb/26.10.0
Server Hostname:        127.0.0.1
Server Port:            18443
SSL/TLS Protocol:       TLSv1.3,TLS_AES_256_GCM_SHA384,256,256

Document Path:          /x
Document Length:        8 bytes

Concurrency Level:      8
Time taken for tests:   2.002 seconds
Complete requests:      985
"""

AB_TAIL = """\
Total transferred:      247235 bytes
HTML transferred:       7880 bytes
Requests per second:    491.93 [#/sec] (mean)
Time per request:       16.262 [ms] (mean)
"""


def ab_output(failed: str = "0", keep_alive: int = 980, non_2xx: int | None = None) -> str:
    middle = f"Failed requests:        {failed}\n"
    if non_2xx is not None:
        middle += f"Non-2xx responses:      {non_2xx}\n"
    middle += f"Keep-Alive requests:    {keep_alive}\n"
    return AB_HEAD + middle + AB_TAIL


class ToolOutputTests(SynchronousTestCase):
    def test_wrk_rate_and_count(self) -> None:
        """wrk's summary gives the requests per second and the request count."""
        rate = tools.parse_wrk(WRK_OK)
        self.assertEqual((rate.per_second, rate.requests), (3935.45, 7891))

    def test_wrk_errors_invalidate_the_run(self) -> None:
        """A wrk run with non-2xx answers or socket errors is refused, not counted."""
        with self.assertRaises(tools.ToolError) as caught:
            tools.parse_wrk(WRK_404)
        self.assertIn("Non-2xx or 3xx responses: 863", str(caught.exception))
        self.assertRaises(tools.ToolError, tools.parse_wrk, self.socket_errors(0, 3, 0, 0))
        self.assertRaises(tools.ToolError, tools.parse_wrk, self.socket_errors(1, 0, 0, 0))
        self.assertRaises(tools.ToolError, tools.parse_wrk, self.socket_errors(0, 0, 0, 9))

    def test_wrk_few_timeouts_are_counted(self) -> None:
        """Timeouts up to a thousandth of the requests are tolerated and counted."""
        rate = tools.parse_wrk(self.socket_errors(0, 0, 0, 7))  # of 7891 requests
        self.assertEqual((rate.per_second, rate.timeouts), (3935.45, 7))

    def socket_errors(self, connect: int, read: int, write: int, timeout: int) -> str:
        line = f"  Socket errors: connect {connect}, read {read}, write {write}, timeout {timeout}"
        return WRK_OK.replace("Requests/sec:", line + "\nRequests/sec:")

    def test_ab_rate_and_keep_alive(self) -> None:
        """ab's summary gives the rate, the requests and how many reused a connection."""
        rate = tools.parse_ab(ab_output(keep_alive=980))
        self.assertEqual((rate.per_second, rate.requests, rate.keep_alive), (491.93, 985, 980))

    def test_ab_failures_invalidate_the_run(self) -> None:
        """An ab run with failed or non-2xx requests is refused, not counted."""
        self.assertRaises(tools.ToolError, tools.parse_ab, ab_output(failed="3"))
        self.assertRaises(tools.ToolError, tools.parse_ab, ab_output(non_2xx=985))

    def test_curl_write_out(self) -> None:
        """curl's -w line gives speed, size and status; anything else is an error."""
        download = tools.parse_curl("612345678.000 1073741824 200")
        self.assertEqual(download, tools.Download(612345678.0, 1 << 30, 200))
        self.assertEqual(tools.parse_curl("0.000 154 404").code, 404)
        self.assertRaises(tools.ToolError, tools.parse_curl, "")


class StatsTests(SynchronousTestCase):
    def test_median_and_spread(self) -> None:
        """A figure over rounds is its median with the lowest and highest round."""
        self.assertEqual(stats.Spread.of([1.2, 0.9, 1.0]), stats.Spread(1.0, 0.9, 1.2, 3))

    def test_ratios_skip_failed_rounds(self) -> None:
        """A round where either side failed has no ratio; the others keep theirs."""
        self.assertEqual(stats.ratios([2.0, None, 3.0, 1.0], [1.0, 1.0, None, 4.0]), [2.0, 0.25])

    def test_verdict_follows_the_median(self) -> None:
        """met or missed is the median against the target, with the rounds that met it."""
        goal = stats.Goal(1.0)
        self.assertEqual(goal.verdict([0.9, 1.1, 1.2]), "met (2/3 rounds)")
        self.assertEqual(goal.verdict([0.9, 0.95, 1.2]), "missed (1/3 rounds)")
        ceiling = stats.Goal(128, at_least=False)
        self.assertEqual(ceiling.verdict([100, 130, 120]), "met (2/3 rounds)")

    def test_formatted_spread(self) -> None:
        """Table cells read median and low-high in the row's unit."""
        self.assertEqual(stats.fmt_spread([1.0, 1.25, 0.5], 2, "x"), ("1.00x", "0.50-1.25x"))


class RowTests(SynchronousTestCase):
    def row(self, key: str) -> rows.Row:
        return next(row for row in rows.ROWS if row.key == key)

    def test_ratio_within_a_round(self) -> None:
        """The proxy row divides mirrord's speed by tuned nginx's of the same round."""
        rounds = [
            {"mirrord proxy": {"speed": 600.0}, "tuned": {"speed": 500.0}},
            {"mirrord proxy": {"speed": 300.0}, "tuned": {"speed": 400.0}},
        ]
        self.assertEqual([self.row("proxy").value(r) for r in rounds], [1.2, 0.75])

    def test_shorter_wall_is_above_one(self) -> None:
        """16 cold clients: mirrord finishing sooner than tuned nginx gives a ratio above 1."""
        r = {"mirrord cold x16": {"wall": 4.0}, "tuned x16": {"wall": 6.0}}
        self.assertEqual(self.row("cold16").value(r), 1.5)
        self.assertTrue(self.row("cold16").goal.met_by(1.5))

    def test_rss_takes_the_largest_worker(self) -> None:
        """Peak RSS per worker is the largest peak among the measures that ran."""
        r = {"mirrord cold x16": {"peak_rss": 90.0}, "w1 x16": {"peak_rss": 110.0}}
        r["w2 x16"] = "skipped: no workers"
        self.assertEqual(self.row("rss16").value(r), 110.0)

    def test_s3_hit_over_local_hit_of_the_same_measure(self) -> None:
        """The fleet's S3 hit row divides the S3 speed by the local hit's
        speed taken on the same member in the same round, and has no verdict."""
        r = {"fleet hit": {"speed": 150e6, "cpu": 6.0, "local_speed": 500e6, "local_cpu": 2.0}}
        row = self.row("fleet-s3")
        self.assertAlmostEqual(row.value(r), 0.3)
        self.assertIsNone(row.value({"fleet hit": "failed: no bucket"}))
        line = rows.render([row], [r], [], "1 round", {}).splitlines()[-1]
        self.assertTrue(line.endswith("| 0.30x | 0.30-0.30x | - |"), line)
        self.assertIn("from S3 150 MB/s", line)

    def test_fleet_faster_than_one_member_is_above_one(self) -> None:
        """Two members finishing 32 cold clients sooner than one member gives
        a ratio above 1; the fetches row is the two members' count."""
        r = {
            "fleet cold two": {"wall": 10.0, "fetches": 1},
            "fleet cold one": {"wall": 15.0, "fetches": 1},
        }
        self.assertEqual(self.row("fleet-cold32").value(r), 1.5)
        self.assertEqual(self.row("fleet-cold32-fetches").value(r), 1)
        self.assertFalse(self.row("fleet-cold32-fetches").goal.met_by(2))

    def test_render_says_what_was_not_measured(self) -> None:
        """The results name a skipped daemon and a failed measure, and mark a
        row without data as skipped instead of inventing a figure."""
        chosen = [self.row("proxy"), self.row("workers-manifest")]
        rounds = [
            {
                "mirrord proxy": {"speed": 6e8, "cpu": 1.5},
                "tuned": {"speed": 5e8},
                "seed": "failed: curl timed out",
                "w2 digest": "skipped: the daemon refused `workers = 2`",
                "mirrord digest": {"rate": 1500.0, "timeouts": 3},
            }
        ]
        text = rows.render(
            chosen, rounds, [("CPU", "AMD EPYC")], "1 round", {"mirrord w2": "refused"}
        )
        proxy = next(line for line in text.splitlines() if line.startswith("| streaming proxy"))
        self.assertIn("| 1.20x | 1.20-1.20x | met (1/1 rounds) |", proxy)
        self.assertIn("mirrord 600 MB/s", proxy)
        workers = next(line for line in text.splitlines() if "workers = 2" in line)
        self.assertTrue(workers.endswith("| - | - | skipped |"), workers)
        self.assertIn("- round 1, seed: failed: curl timed out", text)
        self.assertIn("- mirrord w2 not started: refused", text)
        self.assertIn("- round 1, mirrord digest: 3 wrk timeouts", text)
        self.assertIn("| CPU | AMD EPYC |", text)


class OrderTests(SynchronousTestCase):
    def test_rounds_start_at_different_rows(self) -> None:
        """Each round runs every measure once, starting a third further along."""
        items = list("abcdef")
        orders = [rotated(items, r, 3) for r in range(3)]
        self.assertEqual([o[0] for o in orders], ["a", "c", "e"])
        for order in orders:
            self.assertEqual(sorted(order), items)


class MachineTests(SynchronousTestCase):
    def test_cpu_model(self) -> None:
        """The CPU is named by /proc/cpuinfo's first model name."""
        cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n"
        self.assertEqual(machine.cpu_model(cpuinfo + cpuinfo), "AMD EPYC 7B13")
        self.assertEqual(machine.cpu_model(""), "unknown")

    def test_nginx_runs_with_its_openssl(self) -> None:
        """nginx -V names the OpenSSL nginx runs with, not only the one it was built with."""
        text = (
            "nginx version: nginx/1.22.1\n"
            "built with OpenSSL 3.0.22 25 Aug 2026 (running with OpenSSL 3.0.19 27 Jan 2026)\n"
        )
        self.assertEqual(machine.nginx_versions(text), ("1.22.1", "OpenSSL 3.0.19"))
        same = "nginx version: nginx/1.24.0\nbuilt with OpenSSL 3.0.13 30 Jan 2024\n"
        self.assertEqual(machine.nginx_versions(same), ("1.24.0", "OpenSSL 3.0.13"))

    def test_curl_version(self) -> None:
        """curl is named with its version and TLS library."""
        line = "curl 7.88.1 (x86_64-pc-linux-gnu) libcurl/7.88.1 OpenSSL/3.0.19 zlib/1.2.13\n"
        self.assertEqual(machine.curl_version(line), "7.88.1 with OpenSSL/3.0.19")


class BareSiteTests(SynchronousTestCase):
    def test_same_bytes_and_headers(self) -> None:
        """The ceiling site answers any path with the manifest's bytes and headers."""
        body = b'{"schemaVersion": 2}'
        client = StubTreq(SameBytes(body, b"application/vnd.oci.image.manifest.v1+json", b"d"))
        response = self.successResultOf(client.get("https://127.0.0.1/v2/x/manifests/y"))
        self.assertEqual(response.code, 200)
        self.assertEqual(self.successResultOf(response.content()), body)
        self.assertEqual(response.headers.getRawHeaders("Docker-Content-Digest"), ["d"])
        self.assertEqual(
            response.headers.getRawHeaders("Content-Type"),
            ["application/vnd.oci.image.manifest.v1+json"],
        )
        head = self.successResultOf(client.head("https://127.0.0.1/anything"))
        self.assertEqual((head.code, self.successResultOf(head.content())), (200, b""))


class ProcTests(SynchronousTestCase):
    def test_children_are_found_and_reaped(self) -> None:
        """A process's forked children are listed from /proc, and reap kills
        by PID the ones that do not exit."""
        script = (
            "import subprocess, sys, time\n"
            "kids = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])"
            " for _ in range(2)]\n"
            "print(' '.join(str(k.pid) for k in kids), flush=True)\n"
            "time.sleep(60)\n"
        )
        parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert parent.stdout is not None
            kids = sorted(int(p) for p in parent.stdout.readline().split())
            self.assertEqual(procs.children(parent.pid), kids)
            rss = procs.rss_kib(kids[0])
            self.assertGreater(rss, 0)
            self.assertGreaterEqual(procs.peak_rss_kib(kids[0]), rss)
            started = time.monotonic()
            self.assertEqual(procs.reap(kids, timeout=0.5), kids)
            self.assertLess(time.monotonic() - started, 5)
            deadline = time.monotonic() + 5  # SIGKILL is delivered, not waited for
            while any(procs.alive(k) for k in kids) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.assertEqual([k for k in kids if procs.alive(k)], [])
        finally:
            if parent.poll() is None:
                parent.kill()
                parent.wait(10)
            parent.stdout.close()
