"""The fleet's coordination against a real redis-server on loopback: leases,
members, the shared store's index, and a Redis that is stopped or frozen
costing each call at most its deadline. The client runs on a private
reactor the test iterates (as tests/test_tuning.py does), so nothing here
starts the global reactor or a thread."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mirrord.fleet.index import FleetIndex
from mirrord.fleet.leases import LeaseKeeper, Leases
from mirrord.fleet.members import Members
from mirrord.fleet.redis import FleetRedis, FleetUnavailable, parse_url
from tests.support.redisserver import RedisServer, redis_server, start_redis

__all__ = ["redis_server"]

DEADLINE = 0.5


class Loop:
    """A private reactor, iterated until what a test waits for happens."""

    def __init__(self) -> None:
        self.reactor = EPollReactor()

    def close(self) -> None:
        self.reactor.disconnectAll()
        self.reactor.removeAll()
        self.reactor.iterate(0)
        for call in self.reactor.getDelayedCalls():
            call.cancel()
        self.reactor.waker.connectionLost(None)
        self.reactor._poller.close()

    def step(self) -> None:
        # As reactor.run would: wait no longer than the next timed call
        # (txredisapi parses each element of a reply in a callLater(0)).
        pending = self.reactor.timeout()
        self.reactor.iterate(0.005 if pending is None else min(pending, 0.005))

    def run_until(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "timed out on loopback"
            self.step()

    def run(self, work: Deferred[Any] | Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        """What ``work`` results in (its exception raised here)."""
        d = work if isinstance(work, Deferred) else Deferred.fromCoroutine(work)
        outcome: list[Any] = []
        d.addBoth(outcome.append)
        self.run_until(lambda: bool(outcome), timeout)
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.step()

    def gather(
        self, coroutines: list[Coroutine[Any, Any, Any]], timeout: float = 10.0
    ) -> list[Any]:
        """Run coroutines concurrently; each one's result or exception, in order."""
        outcomes: list[Any] = []
        for coroutine in coroutines:
            d = Deferred.fromCoroutine(coroutine)
            d.addErrback(lambda f: f.value)
            outcomes.append(d)
        return self.run(gatherResults(outcomes), timeout)


@pytest.fixture
def loop() -> Iterator[Loop]:
    loop = Loop()
    yield loop
    loop.close()


def _client(
    loop: Loop, url: str, deadline: float = DEADLINE, retry_after: float = 0.2
) -> FleetRedis:
    client = FleetRedis(loop.reactor, url, deadline=deadline, retry_after=retry_after)
    client.start()
    return client


@pytest.fixture
def fleet(redis_server: RedisServer, loop: Loop) -> Iterator[FleetRedis]:
    client = _client(loop, redis_server.url)
    loop.run(client.call("FLUSHDB"))
    yield client
    loop.run(client.stop())


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, to stop or freeze."""
    server = start_redis(tmp_path / "redis")
    yield server
    server.stop()


def _digest() -> str:
    return "sha256:" + uuid.uuid4().hex * 2


# -- the client --------------------------------------------------------------


def test_url_forms() -> None:
    """redis:// URLs give host, port, database and the optional password."""
    plain = parse_url("redis://10.0.0.5:6380/2")
    assert (plain.host, plain.port, plain.db, plain.password) == ("10.0.0.5", 6380, 2, None)
    secret = parse_url("redis://:s%40cret@redis.internal/0")
    assert (secret.host, secret.port, secret.db, secret.username, secret.password) == (
        "redis.internal",
        6379,
        0,
        None,
        "s@cret",
    )
    with pytest.raises(ValueError):
        parse_url("http://127.0.0.1:6379/0")


def test_password_and_database(own_redis: RedisServer, loop: Loop) -> None:
    """A password in the URL is sent with AUTH and the database is SELECTed
    on every new connection; a wrong password is FleetUnavailable."""
    admin = _client(loop, own_redis.url)
    loop.run(admin.call("CONFIG", "SET", "requirepass", "pw"))
    client = _client(loop, f"redis://:pw@127.0.0.1:{own_redis.port}/3")
    loop.run(client.call("SET", "where", "three"))
    assert loop.run(client.call("GET", "where")) == "three"
    assert loop.run(client.call("SELECT", 3)) == "OK"
    wrong = _client(loop, f"redis://:nope@127.0.0.1:{own_redis.port}/0")
    with pytest.raises(FleetUnavailable):
        loop.run(wrong.call("PING"))
    assert not wrong.up and wrong.last_error
    for c in (admin, client, wrong):
        loop.run(c.stop())


# -- leases ------------------------------------------------------------------


def test_one_of_sixteen_acquires(fleet: FleetRedis, loop: Loop) -> None:
    """Of 16 hosts acquiring one digest at once exactly one gets it, and the
    others are told its name."""
    leases = Leases(fleet)
    digest = _digest()
    owners = [f"https://host{i}:5443" for i in range(16)]
    results = loop.gather([leases.acquire(digest, owner, 30) for owner in owners])
    winners = [owner for owner, result in zip(owners, results, strict=True) if result is None]
    assert len(winners) == 1, results
    assert {r for r in results if r is not None} == {winners[0]}
    assert loop.run(leases.owner(digest)) == winners[0]
    assert loop.run(leases.held()) == {digest: winners[0]}


def test_only_the_owner_renews_and_releases(fleet: FleetRedis, loop: Loop) -> None:
    """Renew and release by anyone but the owner change nothing."""
    leases = Leases(fleet)
    digest = _digest()
    assert loop.run(leases.acquire(digest, "a", 30)) is None
    assert loop.run(leases.renew(digest, "b", 60)) is False
    loop.run(leases.release(digest, "b"))
    assert loop.run(leases.owner(digest)) == "a"
    assert loop.run(fleet.call("PTTL", "mirrord:lease:" + digest)) <= 30_000
    assert loop.run(leases.renew(digest, "a", 60)) is True
    assert loop.run(fleet.call("PTTL", "mirrord:lease:" + digest)) > 30_000
    loop.run(leases.release(digest, "a"))
    assert loop.run(leases.owner(digest)) is None
    assert loop.run(leases.renew(digest, "a", 60)) is False
    assert loop.run(leases.acquire(digest, "b", 30)) is None


def test_lease_expires_after_ttl(fleet: FleetRedis, loop: Loop) -> None:
    """An unrenewed lease is gone after its ttl and another host gets it."""
    leases = Leases(fleet)
    digest = _digest()
    assert loop.run(leases.acquire(digest, "a", 0.3)) is None
    started = time.monotonic()
    assert loop.run(leases.acquire(digest, "b", 0.3)) == "a"
    while loop.run(leases.owner(digest)) is not None:
        assert time.monotonic() - started < 2.0, "the lease outlived its ttl"
        loop.sleep(0.02)
    assert time.monotonic() - started >= 0.25
    assert loop.run(leases.acquire(digest, "b", 0.3)) is None


def test_keeper_on_the_real_reactor(fleet: FleetRedis, loop: Loop) -> None:
    """A keeper renewing every ttl/3 holds a 0.3 s lease for a second;
    stopped, the lease expires."""
    leases = Leases(fleet)
    digest = _digest()
    assert loop.run(leases.acquire(digest, "a", 0.3)) is None
    lost: list[bool] = []
    keeper = LeaseKeeper(loop.reactor, leases, digest, "a", 0.3, on_lost=lambda: lost.append(True))
    assert keeper.active
    loop.sleep(1.0)
    assert loop.run(leases.owner(digest)) == "a"
    assert keeper.renewals >= 5 and not lost
    keeper.stop()
    assert not keeper.active
    loop.sleep(0.45)
    assert loop.run(leases.owner(digest)) is None
    assert not lost


def test_keeper_on_a_clock(fleet: FleetRedis, loop: Loop) -> None:
    """On a task.Clock the keeper renews exactly when ttl/3 passes, and calls
    on_lost (then stops) when the key names someone else."""
    leases = Leases(fleet)
    digest = _digest()
    key = "mirrord:lease:" + digest
    clock = Clock()
    assert loop.run(leases.acquire(digest, "a", 3.0)) is None
    lost: list[bool] = []
    keeper = LeaseKeeper(clock, leases, digest, "a", 3.0, on_lost=lambda: lost.append(True))
    loop.run(fleet.call("PEXPIRE", key, 1500))
    clock.advance(0.9)
    loop.sleep(0.05)
    assert keeper.renewals == 0, "renewed before ttl/3"
    clock.advance(0.1)
    loop.run_until(lambda: keeper.renewals == 1)
    assert loop.run(fleet.call("PTTL", key)) > 2500
    loop.run(fleet.call("SET", key, "b"))
    clock.advance(1.0)
    loop.run_until(lambda: bool(lost))
    assert not keeper.active and keeper.lost
    assert loop.run(leases.owner(digest)) == "b"
    clock.advance(10)
    loop.sleep(0.05)
    assert lost == [True] and keeper.renewals == 1


def test_keeper_rides_out_an_outage(own_redis: RedisServer, loop: Loop) -> None:
    """A renewal that fails because Redis is unavailable neither stops the
    keeper nor reports the lease lost; the next one succeeds."""
    client = _client(loop, own_redis.url)
    leases = Leases(client)
    digest = _digest()
    clock = Clock()
    assert loop.run(leases.acquire(digest, "a", 30)) is None
    lost: list[bool] = []
    keeper = LeaseKeeper(clock, leases, digest, "a", 30, on_lost=lambda: lost.append(True))
    own_redis.pause()
    try:
        clock.advance(10)
        loop.run_until(lambda: not client.up)
        loop.sleep(0.3)
    finally:
        own_redis.resume()
    assert keeper.active and not lost
    clock.advance(10)
    loop.run_until(lambda: keeper.renewals == 1)
    assert not lost
    keeper.stop()
    loop.run(client.stop())


# -- members -----------------------------------------------------------------


def test_members_list_and_expiry(fleet: FleetRedis, loop: Loop) -> None:
    """Started members are listed with their addresses; a stopped one leaves
    at once, and one whose heartbeat stopped is gone within its ttl."""
    a = Members(fleet, loop.reactor, "a", "https://10.0.0.1:5443", ttl=0.3)
    b = Members(fleet, loop.reactor, "b", "https://10.0.0.2:5443", ttl=0.3)
    # c beats once (start is "now") on a clock that never moves again.
    c = Members(fleet, Clock(), "c", "https://10.0.0.3:5443", ttl=0.3)
    for member in (a, b, c):
        member.start()
    loop.run_until(lambda: a.beats and b.beats and c.beats)
    assert loop.run(a.list()) == {
        "a": "https://10.0.0.1:5443",
        "b": "https://10.0.0.2:5443",
        "c": "https://10.0.0.3:5443",
    }
    loop.run(b.stop())
    assert set(loop.run(a.list())) <= {"a", "c"}
    loop.sleep(0.45)
    assert loop.run(a.list()) == {"a": "https://10.0.0.1:5443"}
    assert a.beats >= 3, "a did not keep beating"
    loop.run(a.stop())
    assert loop.run(c.list()) == {}


# -- the index ---------------------------------------------------------------


def test_index_add_touch_remove(fleet: FleetRedis, loop: Loop) -> None:
    """add counts a digest once, touch only moves its access later, remove
    subtracts once."""
    index = FleetIndex(fleet)
    one, two = _digest(), _digest()
    assert loop.run(index.add(one, 100, 1000.0)) == 100
    assert loop.run(index.add(one, 100, 900.0)) == 100
    assert loop.run(index.add(two, 50, 1100.0)) == 150
    assert (loop.run(index.total()), loop.run(index.count())) == (150, 2)
    assert loop.run(index.oldest(5)) == [(one, 100, 1000.0), (two, 50, 1100.0)]
    loop.run(index.touch(one, 1200.5))
    loop.run(index.touch(two, 1000.0))
    loop.run(index.touch(_digest(), 1.0))
    assert loop.run(index.oldest(5)) == [(two, 50, 1100.0), (one, 100, 1200.5)]
    assert loop.run(index.count()) == 2
    assert loop.run(index.remove(one)) is True
    assert loop.run(index.remove(one)) is False
    assert (loop.run(index.total()), loop.run(index.count())) == (50, 1)
    assert loop.run(index.size(two)) == 50 and loop.run(index.size(one)) is None


def test_large_sizes_stay_exact(fleet: FleetRedis, loop: Loop) -> None:
    """Totals beyond 2**40 bytes come back as exact integers, through Lua too."""
    index = FleetIndex(fleet)
    big = (1 << 42) + 7
    assert loop.run(index.add(_digest(), big, 1.0)) == big
    result = loop.run(index.reconcile([], started=0.0))
    assert result.total == big == loop.run(index.total())


def test_eviction_candidates_skip_pins(fleet: FleetRedis, loop: Loop) -> None:
    """Candidates are oldest first, skip pinned blobs and stop at the
    bytes asked for or the limit."""
    index = FleetIndex(fleet)
    digests = [_digest() for _ in range(6)]
    for when, digest in enumerate(digests):
        loop.run(index.add(digest, 10, float(when)))
    loop.run(index.pin({digests[0], digests[2]}))
    assert loop.run(index.pinned()) == {digests[0], digests[2]}
    assert loop.run(index.eviction_candidates(25, 10)) == [
        (digests[1], 10),
        (digests[3], 10),
        (digests[4], 10),
    ]
    assert loop.run(index.eviction_candidates(1000, 2)) == [(digests[1], 10), (digests[3], 10)]
    assert loop.run(index.eviction_candidates(0, 10)) == []
    loop.run(index.unpin({digests[0]}))
    assert loop.run(index.eviction_candidates(5, 10)) == [(digests[0], 10)]
    assert loop.run(index.claim_eviction(digests[2])) is False, "claimed a pinned blob"


def test_candidates_past_many_pins(fleet: FleetRedis, loop: Loop) -> None:
    """More pinned blobs than a page still leave the unpinned ones findable."""
    index = FleetIndex(fleet)
    pinned = {_digest() for _ in range(600)}
    for digest in pinned:
        loop.run(index.add(digest, 1, 1.0))
    free = _digest()
    loop.run(index.add(free, 1, 2.0))
    loop.run(index.pin(pinned))
    assert loop.run(index.eviction_candidates(1, 1)) == [(free, 1)]


def test_one_claim_per_digest(redis_server: RedisServer, fleet: FleetRedis, loop: Loop) -> None:
    """Two hosts claiming the same 20 candidates at once: each digest is
    claimed by exactly one, and the total drops by each size once."""
    other = _client(loop, redis_server.url)
    mine, theirs = FleetIndex(fleet), FleetIndex(other)
    digests = [_digest() for _ in range(20)]
    for digest in digests:
        loop.run(mine.add(digest, 7, 1.0))
    claims = loop.gather([index.claim_eviction(d) for d in digests for index in (mine, theirs)])
    pairs = list(zip(claims[0::2], claims[1::2], strict=True))
    assert all(sorted(pair) == [False, True] for pair in pairs), pairs
    assert (loop.run(mine.total()), loop.run(mine.count())) == (0, 0)
    loop.run(other.stop())


def test_claim_guards(fleet: FleetRedis, loop: Loop) -> None:
    """A claim gives way to an access after the candidates were read, and to
    a total already under the cap."""
    index = FleetIndex(fleet)
    a, b = _digest(), _digest()
    loop.run(index.add(a, 10, 100.25))
    loop.run(index.add(b, 10, 200.0))
    ((seen, _, when),) = loop.run(index.oldest(1))
    assert (seen, when) == (a, 100.25)
    loop.run(index.touch(a, 150.0))
    assert loop.run(index.claim_eviction(a, seen_when=when)) is False
    assert loop.run(index.claim_eviction(a, seen_when=150.0, above=15)) is True
    assert loop.run(index.claim_eviction(b, above=15)) is False
    assert loop.run(index.total()) == 10


def test_reconcile(fleet: FleetRedis, loop: Loop) -> None:
    """Reconcile adds orphans with their modification time, fixes sizes,
    drops dangling entries older than the listing, keeps newer ones, and
    a second pass changes nothing."""
    index = FleetIndex(fleet)
    kept, dangling, wrong, orphan, newer = (_digest() for _ in range(5))
    loop.run(index.add(kept, 10, 100.0))
    loop.run(index.add(dangling, 20, 100.0))
    loop.run(index.add(wrong, 30, 110.0))
    started = 500.0
    loop.run(index.add(newer, 40, 501.0))
    listing = [(kept, 10, 50.0), (wrong, 33, 50.0), (orphan, 5, 60.0)]
    result = loop.run(index.reconcile(listing, started))
    assert (result.orphans_added, result.sizes_fixed, result.dangling_removed) == (1, 1, 1)
    assert result.total == 10 + 33 + 5 + 40 == loop.run(index.total())
    assert loop.run(index.oldest(10)) == [
        (orphan, 5, 60.0),
        (kept, 10, 100.0),
        (wrong, 33, 110.0),
        (newer, 40, 501.0),
    ]
    again = loop.run(index.reconcile(listing, started))
    assert (again.orphans_added, again.sizes_fixed, again.dangling_removed) == (0, 0, 0)
    loop.run(fleet.call("SET", "mirrord:index:total", 999))
    assert loop.run(index.reconcile(listing, started)).total == 88


# -- Redis down --------------------------------------------------------------


def _every_call(client: FleetRedis) -> list[Callable[[], Coroutine[Any, Any, Any]]]:
    leases, index = Leases(client), FleetIndex(client)
    members = Members(client, Clock(), "m", "https://m:1")
    digest = _digest()
    return [
        lambda: leases.acquire(digest, "a", 30),
        lambda: leases.renew(digest, "a", 30),
        lambda: leases.release(digest, "a"),
        lambda: leases.owner(digest),
        lambda: leases.held(),
        lambda: members.list(),
        lambda: index.add(digest, 1, 1.0),
        lambda: index.touch(digest, 2.0),
        lambda: index.remove(digest),
        lambda: index.total(),
        lambda: index.count(),
        lambda: index.oldest(3),
        lambda: index.pin({digest}),
        lambda: index.pinned(),
        lambda: index.eviction_candidates(10, 10),
        lambda: index.claim_eviction(digest),
        lambda: index.reconcile([], 0.0),
    ]


def _fails_within(loop: Loop, make: Callable[[], Coroutine[Any, Any, Any]], bound: float) -> float:
    started = time.monotonic()
    with pytest.raises(FleetUnavailable):
        loop.run(make(), timeout=bound + 5)
    elapsed = time.monotonic() - started
    assert elapsed < bound, f"took {elapsed:.2f} s"
    return elapsed


def test_stopped_redis_fails_fast(own_redis: RedisServer, loop: Loop) -> None:
    """With Redis stopped every call raises FleetUnavailable well within the
    deadline, and calls work again once it is back."""
    client = _client(loop, own_redis.url, deadline=DEADLINE, retry_after=0.2)
    assert loop.run(client.call("PING")) == "PONG" and client.up
    own_redis.stop()
    calls = _every_call(client)
    for make in calls:
        _fails_within(loop, make, DEADLINE)
        loop.sleep(0.21)  # past retry_after: each call really tries
    assert not client.up and client.last_error
    own_redis.start()
    loop.sleep(0.21)
    assert loop.run(client.call("PING")) == "PONG" and client.up
    for make in calls:
        loop.run(make())
    loop.run(client.stop())


def test_frozen_redis_fails_within_the_deadline(own_redis: RedisServer, loop: Loop) -> None:
    """With Redis frozen (SIGSTOP) calls fail within the deadline, 50
    concurrent ones too, without piling up; after SIGCONT they work again."""
    client = _client(loop, own_redis.url, deadline=DEADLINE, retry_after=0.2)
    index = FleetIndex(client)
    loop.run(index.add(_digest(), 1, 1.0))
    own_redis.pause()
    try:
        for make in _every_call(client)[:6]:
            elapsed = _fails_within(loop, make, DEADLINE + 0.25)
            loop.sleep(0.21)
        assert elapsed >= DEADLINE * 0.9, "failed before the deadline: was Redis frozen?"
        started = time.monotonic()
        results = loop.gather([index.total() for _ in range(50)], timeout=5)
        assert all(isinstance(r, FleetUnavailable) for r in results), results
        assert time.monotonic() - started < DEADLINE + 0.25
        # Within retry_after of a failure, calls do not even try.
        assert _fails_within(loop, index.total, 0.05) < 0.05
        # A fresh connection to a frozen Redis is accepted by the kernel,
        # then times out: still bounded.
        loop.sleep(0.21)
        _fails_within(loop, index.count, DEADLINE + 0.25)
    finally:
        own_redis.resume()
    loop.sleep(0.21)
    started = time.monotonic()
    assert loop.run(index.count()) == 1
    assert time.monotonic() - started < DEADLINE
    assert client.up
    loop.run(client.stop())


def test_stopped_client_refuses(fleet: FleetRedis, loop: Loop, redis_server: RedisServer) -> None:
    """After stop() calls fail at once instead of reconnecting."""
    client = _client(loop, redis_server.url)
    assert loop.run(client.call("PING")) == "PONG"
    loop.run(client.stop())
    with pytest.raises(FleetUnavailable):
        loop.run(client.call("PING"))


def _connections_received(loop: Loop, client: FleetRedis) -> int:
    info = loop.run(client.call("INFO", "stats"))
    (line,) = (x for x in info.splitlines() if x.startswith("total_connections_received:"))
    return int(line.split(":")[1])


def test_one_connection_attempt_at_a_time(own_redis: RedisServer, loop: Loop) -> None:
    """Concurrent calls with no connection share one attempt: two rounds of
    50 calls to a frozen Redis open two connections, not a hundred."""
    watcher = _client(loop, own_redis.url)
    before = _connections_received(loop, watcher)
    client = _client(loop, own_redis.url, retry_after=0.0)
    own_redis.pause()
    try:
        for _ in range(2):
            results = loop.gather([client.call("PING") for _ in range(50)], timeout=5)
            assert all(isinstance(r, FleetUnavailable) for r in results), results
    finally:
        own_redis.resume()
    assert loop.run(client.call("PING")) == "PONG"
    # Two rounds, the PING just now, and none for the watcher (connected before).
    assert _connections_received(loop, watcher) - before <= 3
    for c in (client, watcher):
        loop.run(c.stop())


def test_a_cancelled_call_is_no_outage(fleet: FleetRedis, loop: Loop) -> None:
    """A caller that cancels its call leaves the client up and the connection
    in step: the next call gets its own reply."""
    loop.run(fleet.call("SET", "k", "v"))
    slow = Deferred.fromCoroutine(fleet.call("BLPOP", "nothing", 0.2))
    loop.reactor.iterate(0)
    slow.cancel()
    with pytest.raises(CancelledError):
        loop.run(slow)
    assert fleet.up
    assert loop.run(fleet.call("GET", "k")) == "v"
    assert fleet.failures == 0


def test_importing_installs_no_reactor() -> None:
    """Importing the fleet modules leaves the global reactor alone, so
    twistd can still install the one it was asked for (txredisapi, imported
    at its top, would install the default one)."""
    code = (
        "import sys\n"
        "import mirrord.fleet.index, mirrord.fleet.leases, mirrord.fleet.members\n"
        "assert 'twisted.internet.reactor' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
