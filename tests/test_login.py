"""Mirror login under hostile clients: password checks run in the login
worker's thread with a bounded queue, an address with too many failed
logins is refused for a while, and other clients are not affected."""

from __future__ import annotations

import base64
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import treq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mirrord.config import Access, ConfigError, from_mapping
from mirrord.front.guard import FailedLogins
from mirrord.front.login import LoginWorker, MirrorLogin, run_inline
from mirrord.passwords import make_hash
from tests.support.images import OCI_MANIFEST
from tests.support.memory import MIRROR, MemoryMirror, Reply
from tests.test_hashing import ThreadedReactor

OK = "/v2/alpine/manifests/latest"
USERS = {"ops": make_hash("s3cret")}
README = Path(__file__).parent.parent / "README.md"
EXAMPLE_CONFIG = Path(__file__).parent.parent / "systemd" / "mirrord.toml"


class HeldPool:
    """A thread pool that runs nothing until the test says so, on the test's
    own thread: the order of events is the test's, not the scheduler's."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[bool, object], None], Callable[[], object]]] = []

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, object], None], f: Callable[[], object]
    ) -> None:
        self.jobs.append((on_result, f))

    def run_all(self) -> None:
        jobs, self.jobs = self.jobs, []
        for on_result, f in jobs:
            on_result(True, f())


class Direct:
    """callFromThread for a pool that runs on the test's thread."""

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        f(*args)


def held_worker(test: SynchronousTestCase, max_checks: int = 8) -> tuple[LoginWorker, HeldPool]:
    pool = HeldPool()
    worker = LoginWorker(Direct(), max_checks=max_checks, pool=pool)
    worker.startService()
    test.addCleanup(worker.stopService)
    return worker, pool


def counting(runner: Callable[[Callable[[], bool]], Deferred[bool]], calls: list[int]) -> Any:
    """The runner, noting the thread each password check runs in."""

    def run(check: Callable[[], bool]) -> Deferred[bool]:
        def noted() -> bool:
            calls.append(threading.get_ident())
            return check()

        return runner(noted)

    return run


def basic(user: str, password: str) -> dict[str, list[str]]:
    return {"Authorization": ["Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()]}


class LoginMirror:
    def __init__(self, test: SynchronousTestCase, runner: Any = run_inline, **access: Any) -> None:
        self.test = test
        self.mirror = MemoryMirror(
            test,
            Path(tempfile.mkdtemp()),
            upstreams=("http://second.test",),  # anonymous: no token dance needed
            access=Access(users=USERS, trusted_proxies=("127.0.0.1",), **access),
            login_checks=runner,
        )

    def start(self, path: str, address: str, password: str) -> Deferred[Any]:
        headers = {"X-Forwarded-For": [address], **basic("ops", password)}
        d = self.mirror.client.get(MIRROR + path, headers=headers)
        self.mirror.settle()
        return d

    def get(self, path: str, address: str, password: str) -> Reply:
        return self.mirror.get(path, {"X-Forwarded-For": [address], **basic("ops", password)})

    def finish(self, pending: Deferred[Any]) -> Reply:
        self.mirror.settle()
        response = self.test.successResultOf(pending)
        body = treq.content(response)
        self.mirror.settle()
        return Reply(response.code, response.headers, self.test.successResultOf(body), None)


class WorkerTests(SynchronousTestCase):
    def test_check_waits_for_the_worker(self) -> None:
        """A request is answered once the worker ran its check; remembered answers need none."""
        worker, pool = held_worker(self)
        calls: list[int] = []
        login = LoginMirror(self, counting(worker.run, calls))
        pending = login.start(OK, "10.0.0.1", "s3cret")
        self.assertNoResult(pending)
        self.assertEqual((calls, len(pool.jobs)), ([], 1))
        pool.run_all()
        self.assertEqual(login.finish(pending).code, 200)
        self.assertEqual(len(calls), 1)
        self.assertEqual(login.get(OK, "10.0.0.1", "s3cret").code, 200)
        self.assertEqual((len(calls), pool.jobs), (1, []))

    def test_check_runs_in_a_worker_thread(self) -> None:
        """With a real thread pool, scrypt runs in a thread that is not the reactor's."""
        reactor = ThreadedReactor()
        worker = LoginWorker(reactor)
        worker.startService()
        self.addCleanup(worker.stopService)
        calls: list[int] = []
        login = LoginMirror(self, counting(worker.run, calls))
        pending = login.start(OK, "10.0.0.1", "s3cret")
        reactor.run_until(lambda: worker.checks == 0 and bool(calls))
        self.assertEqual(login.finish(pending).code, 200)
        self.assertEqual(len(calls), 1)
        self.assertNotEqual(calls[0], threading.get_ident())

    def test_token_after_a_checked_login_works_on_v2(self) -> None:
        """/token with checked credentials hands out a token the mirror then accepts on /v2/."""
        worker, pool = held_worker(self)
        mirror = MemoryMirror(
            self, Path(tempfile.mkdtemp()), access=Access(users=USERS), login_checks=worker.run
        )
        url = MIRROR + "/token?service=fakehub&scope=repository:alpine:pull"
        pending = mirror.client.get(url, headers=basic("ops", "s3cret"))
        mirror.settle()
        self.assertNoResult(pending)
        pool.run_all()
        mirror.settle()
        response = self.successResultOf(pending)
        self.assertEqual(response.code, 200)
        body = treq.json_content(response)
        mirror.settle()
        token = self.successResultOf(body)["token"]
        reply = mirror.get(OK, {"Authorization": f"Bearer {token}", "Accept": [OCI_MANIFEST]})
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual(pool.jobs, [])

    def test_full_queue_is_refused_at_once(self) -> None:
        """With the worker full, another login is 503 with Retry-After at once, not queued."""
        worker, pool = held_worker(self, max_checks=2)
        login = LoginMirror(self, worker.run)
        waiting = [login.start(OK, f"10.0.0.{i}", f"guess{i}") for i in range(2)]
        refused = login.get(OK, "10.0.0.9", "s3cret")
        self.assertEqual(refused.code, 503, refused.body)
        self.assertEqual(refused.json()["errors"][0]["code"], "UNAVAILABLE")
        self.assertEqual(refused.header("retry-after"), "1")
        self.assertEqual(len(pool.jobs), 2)
        pool.run_all()
        self.assertEqual([login.finish(d).code for d in waiting], [401, 401])
        self.assertEqual(worker.checks, 0)
        admitted = login.start(OK, "10.0.0.9", "s3cret")
        pool.run_all()
        self.assertEqual(login.finish(admitted).code, 200)

    def test_same_credentials_share_one_check(self) -> None:
        """Requests bringing the same credentials meanwhile wait for one check, not one each."""
        worker, pool = held_worker(self)
        login = LoginMirror(self, worker.run)
        pending = [login.start(OK, "10.0.0.1", "s3cret") for _ in range(3)]
        self.assertEqual(len(pool.jobs), 1)
        pool.run_all()
        self.assertEqual([login.finish(d).code for d in pending], [200, 200, 200])

    def test_client_leaving_cancels_its_check(self) -> None:
        """A client that leaves while its check waits: the check never runs, nothing is written."""
        worker, pool = held_worker(self)
        calls: list[int] = []
        login = LoginMirror(self, counting(worker.run, calls))
        site = login.mirror.wiring.site
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        auth = basic("ops", "guess")["Authorization"][0]
        channel.dataReceived(
            f"GET {OK} HTTP/1.1\r\nHost: mirror.test\r\nAuthorization: {auth}\r\n\r\n".encode()
        )
        self.assertEqual((len(site.active), len(pool.jobs), transport.value()), (1, 1, b""))
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(site.active), 0)
        pool.run_all()
        self.assertEqual((calls, transport.value(), worker.checks), ([], b"", 0))
        again = login.start(OK, "127.0.0.1", "s3cret")
        pool.run_all()
        self.assertEqual(login.finish(again).code, 200)
        self.assertEqual(len(site.guard.failed_logins), 0)  # the abandoned check counted nothing

    def test_stopped_worker_refuses(self) -> None:
        """Once the daemon stopped the worker, a login is refused rather than queued for ever."""
        worker, pool = held_worker(self)
        worker.stopService()
        self.addCleanup(worker.startService)
        login = LoginMirror(self, worker.run)
        self.assertEqual(login.get(OK, "10.0.0.1", "s3cret").code, 503)
        self.assertEqual(pool.jobs, [])

    def test_a_check_that_breaks_is_a_registry_error(self) -> None:
        """A check that raises gives the client a JSON 500 and a logged failure, not a hang."""
        login = LoginMirror(self, lambda check: fail(RuntimeError("scrypt broke")))
        reply = login.get(OK, "10.0.0.1", "s3cret")
        self.assertEqual(reply.code, 500)
        self.assertEqual(reply.json()["errors"][0]["code"], "UNKNOWN")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class FailedLoginTests(SynchronousTestCase):
    def test_limit_per_address_then_admitted_after_the_window(self) -> None:
        """N wrong passwords: 429 with Retry-After, even for the right one; others unaffected."""
        login = LoginMirror(self, max_failed_logins=3, failed_login_window=60)
        clock, second = login.mirror.clock, login.mirror.second
        for i in range(3):
            self.assertEqual(login.get(OK, "10.0.0.1", f"guess{i}").code, 401)
        for path in (OK, "/token?service=x"):
            refused = login.get(path, "10.0.0.1", "s3cret")
            self.assertEqual(refused.code, 429, refused.body)
            self.assertEqual(refused.json()["errors"][0]["code"], "TOOMANYREQUESTS")
            self.assertEqual(refused.header("retry-after"), "60")
        self.assertEqual(login.get(OK, "::ffff:10.0.0.1", "s3cret").code, 429)
        self.assertEqual(second.counts["requests"], 0)
        self.assertEqual(login.get(OK, "10.0.0.2", "s3cret").code, 200)
        self.assertEqual(login.get(OK, "10.0.0.2", "guess").code, 401)
        clock.advance(59.5)
        self.assertEqual(login.get(OK, "10.0.0.1", "s3cret").header("retry-after"), "1")
        clock.advance(0.5)
        self.assertEqual(login.get(OK, "10.0.0.1", "s3cret").code, 200)

    def test_guesses_sent_at_once_count_as_they_are_checked(self) -> None:
        """Many guesses at once from one address: only the limit's worth is checked."""
        worker, pool = held_worker(self)
        login = LoginMirror(self, worker.run, max_failed_logins=3, failed_login_window=60)
        waiting = [login.start(OK, "10.0.0.1", f"guess{i}") for i in range(3)]
        for i in range(3, 6):
            refused = login.get(OK, "10.0.0.1", f"guess{i}")
            self.assertEqual((refused.code, refused.header("retry-after")), (429, "1"))
        self.assertEqual(len(pool.jobs), 3)
        same = login.start(OK, "10.0.0.1", "guess0")  # joins the check under way
        pool.run_all()
        self.assertEqual([login.finish(d).code for d in [*waiting, same]], [401] * 4)
        self.assertEqual(login.get(OK, "10.0.0.1", "s3cret").header("retry-after"), "60")
        self.assertEqual(pool.jobs, [])
        other = login.start(OK, "10.0.0.2", "s3cret")
        pool.run_all()
        self.assertEqual(login.finish(other).code, 200)
        self.assertEqual(login.mirror.wiring.site.guard.failed_logins._checking, {})

    def test_failures_spread_over_more_than_the_window_never_add_up(self) -> None:
        """Failures count over a window from the first: old ones are forgotten."""
        login = LoginMirror(self, max_failed_logins=3, failed_login_window=60)
        for _ in range(3):
            self.assertEqual(login.get(OK, "10.0.0.1", "guess").code, 401)
            login.mirror.clock.advance(31)
        self.assertEqual(login.get(OK, "10.0.0.1", "s3cret").code, 200)

    def test_zero_turns_the_limit_off(self) -> None:
        login = LoginMirror(self, max_failed_logins=0)
        for _ in range(20):
            self.assertEqual(login.get(OK, "10.0.0.1", "guess").code, 401)
        self.assertEqual(login.get(OK, "10.0.0.1", "s3cret").code, 200)

    def test_ipv6_counts_per_slash_64(self) -> None:
        """Addresses of one IPv6 /64 share their failures; another /64 does not."""
        clock = Clock()
        failures = FailedLogins(2, 60, clock.seconds)
        failures.failed("2001:db8:1:1::1")
        failures.failed("2001:db8:1:1:ffff::2")
        self.assertEqual(failures.refused_for("2001:db8:1:1::3"), 60)
        self.assertIsNone(failures.refused_for("2001:db8:1:2::1"))

    def test_map_of_addresses_is_bounded(self) -> None:
        """A flood from many addresses keeps at most the configured number of records."""
        clock = Clock()
        failures = FailedLogins(5, 60, clock.seconds, max_addresses=100)
        for i in range(1000):
            failures.failed(f"10.0.{i // 256}.{i % 256}")
        self.assertLessEqual(len(failures), 100)
        clock.advance(61)
        failures.failed("10.9.9.9")
        self.assertIsNone(failures.refused_for("10.0.3.231"))


class LoginCheckTests(SynchronousTestCase):
    def test_garbage_is_refused_without_a_check(self) -> None:
        """Undecodable headers are wrong, and cost no scrypt."""
        calls: list[int] = []
        login = MirrorLogin(USERS, Clock().seconds, run=counting(run_inline, calls))
        for header in (b"Basic !!!", b"Basic " + b"\xff" * 8):
            self.assertIs(self.successResultOf(login.check(header)), False)
        self.assertEqual(calls, [])

    def test_unknown_user_costs_a_check_like_a_known_one(self) -> None:
        """An unknown user is refused after the same scrypt a wrong password
        costs, so the time of the answer does not reveal which users exist."""
        calls: list[int] = []
        login = MirrorLogin(USERS, Clock().seconds, run=counting(run_inline, calls))
        nobody = b"Basic " + base64.b64encode(b"nobody:" + next(iter(USERS)).encode())
        self.assertIs(self.successResultOf(login.check(nobody)), False)
        self.assertEqual(len(calls), 1)


class ConfigTests(SynchronousTestCase):
    def test_keys_defaults_and_bad_values(self) -> None:
        """The new [access] keys parse, default to a limit that is on, and reject nonsense."""
        self.assertEqual((Access().max_failed_logins, Access().failed_login_window), (10, 300.0))
        access = from_mapping({"access": {"max_failed_logins": 0, "failed_login_window": 30}})
        self.assertEqual(
            (access.access.max_failed_logins, access.access.failed_login_window), (0, 30.0)
        )
        for bad in (
            {"max_failed_logins": -1},
            {"failed_login_window": 0},
            {"max_failed_logins": "5"},
        ):
            with self.subTest(bad=bad):
                self.assertRaises(ConfigError, from_mapping, {"access": bad})

    def test_keys_are_documented(self) -> None:
        for key in ("max_failed_logins", "failed_login_window"):
            self.assertTrue(f"`[access] {key}`" in README.read_text(), key)
            self.assertTrue(f"#{key} = " in EXAMPLE_CONFIG.read_text(), key)
