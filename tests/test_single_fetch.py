"""One upstream fetch per digest, whatever clients do: leaders that leave
before the upstream answers or mid-body, followers the privacy rule turns
away, one digest through two registries, and a start that failed once."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from mirrord.config import Registry
from tests.support.blobs import Collector, PacedBlobs
from tests.support.memory import MIRROR, MemoryMirror


class SingleFetchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.data = os.urandom(300_000)
        self.digest = "sha256:" + hashlib.sha256(self.data).hexdigest()
        self.gate = PacedBlobs({self.digest: self.data})
        self.mirror = MemoryMirror(
            self,
            Path(tempfile.mkdtemp()),
            upstreams=("http://gate.test",),
            registries={"other.io": Registry("other.io", ("http://gate.test",))},
        )
        self.mirror.add_host(b"gate.test", self.gate)
        self.path = f"/v2/library/x/blobs/{self.digest}"

    def start(self, path: str | None = None, hang_up: bool = False) -> tuple[Deferred, Collector]:
        reader = Collector(hang_up)
        d = self.mirror.client.get(MIRROR + (path or self.path))
        d.addCallback(lambda response: (response.deliverBody(reader), response)[1])
        return d, reader

    def publish(self) -> None:
        self.mirror.settle()
        self.mirror.clock.advance(1)
        self.mirror.settle()

    def assert_hit_now(self) -> None:
        self.publish()
        reply = self.mirror.get(self.path)
        self.assertEqual((reply.code, reply.header("x-mirrord-cache")), (200, "HIT"))
        self.assertEqual(reply.body, self.data)

    def test_leader_leaving_before_headers(self) -> None:
        """The first client leaves while the upstream has not answered: the
        others follow the same fetch, which completes into the cache."""
        self.gate.park = True
        leader, _ = self.start()
        followers = [self.start() for _ in range(3)]
        self.mirror.settle()
        leader.cancel()
        self.mirror.settle()
        self.failureResultOf(leader)
        self.assertEqual(self.gate.gets, 1)
        self.gate.answer_parked()
        self.mirror.settle()
        for _, reader in followers:
            self.assertEqual(reader.data, self.data)
        self.assertEqual(self.gate.gets, 1)
        self.assert_hit_now()
        self.assertEqual(self.gate.gets, 1)

    def test_leader_leaving_before_headers_alone(self) -> None:
        """With nobody waiting, the fetch the leader started still completes,
        so the next request is a hit."""
        self.gate.park = True
        leader, _ = self.start()
        self.mirror.settle()
        leader.cancel()
        self.mirror.settle()
        self.failureResultOf(leader)
        self.gate.answer_parked()
        self.assert_hit_now()
        self.assertEqual(self.gate.gets, 1)

    def test_leader_leaving_mid_body(self) -> None:
        """The first client hangs up after its first bytes; the fill goes on."""
        self.gate.hold_at = 50_000
        _, quitter = self.start(hang_up=True)
        self.mirror.settle()
        followers = [self.start() for _ in range(3)]
        self.mirror.settle()
        self.gate.release()
        self.mirror.settle()
        self.assertTrue(quitter.ended)
        for _, reader in followers:
            self.assertEqual(reader.data, self.data)
        self.assert_hit_now()
        self.assertEqual(self.gate.gets, 1)

    def test_two_registries_share_one_fetch(self) -> None:
        """One digest asked for through two registries is fetched once."""
        self.gate.hold_at = 50_000
        _, hub = self.start()
        self.mirror.settle()
        _, other = self.start(f"/v2/other.io/x/blobs/{self.digest}")
        self.mirror.settle()
        self.gate.release()
        self.mirror.settle()
        self.assertEqual(hub.data, self.data)
        self.assertEqual(other.data, self.data)
        self.assertEqual(self.gate.gets, 1)

    def test_failed_start_is_retried_once(self) -> None:
        """The upstream fails the first GET: its client gets the 503, and of
        the three clients waiting on it exactly one tries again."""
        self.gate.park = True
        self.gate.fail_parked = True
        leader = self.mirror.client.get(MIRROR + self.path)
        followers = [self.start() for _ in range(3)]
        self.mirror.settle()
        self.gate.hold_at = 50_000  # the retry stays running while the others join
        self.gate.answer_parked()
        self.mirror.settle()
        self.assertEqual(self.successResultOf(leader).code, 503)
        self.gate.release()
        self.mirror.settle()
        for _, reader in followers:
            self.assertEqual(reader.data, self.data)
        self.assertEqual(self.gate.gets, 2)


class RefusedFollowerTests(SynchronousTestCase):
    """A follower the privacy rule turns away gets the upstream's answer
    to a HEAD and starts no fetch of its own."""

    def test_refused_follower_starts_no_fetch(self) -> None:
        mirror = MemoryMirror(self, Path(tempfile.mkdtemp()))
        hub = mirror.hub
        private = mirror.private
        blob = max(
            (d for d in private.blobs if d != private.manifest_digest),
            key=lambda d: private.blob_path(d).stat().st_size,
        )
        alice = mirror.pull_headers("alice/private", auth=("alice", "secret"))
        hub.cdn_hold_at = 10_000
        path = f"/v2/alice/private/blobs/{blob}"
        pending = mirror.client.get(MIRROR + path, headers=alice)
        mirror.settle()
        strangers = [
            mirror.get(path),
            mirror.get(path, mirror.pull_headers("library/alpine")),
        ]
        self.assertEqual([s.code for s in strangers], [401, 401])
        hub.release_cdn()
        mirror.settle()
        self.assertEqual(self.successResultOf(pending).code, 200)
        self.assertEqual(hub.counts["GET blobs"], 1)
        self.assertEqual(hub.counts["cdn GET"], 1)
