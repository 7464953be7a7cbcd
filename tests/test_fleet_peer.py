"""One host of the fleet reading a blob from another: the fleet's signature
(``mirrord.fleet.secret``), the endpoint that streams a published blob or a
running fill (``mirrord.fleet.endpoint``) and the client the other host
uses (``mirrord.fleet.peer``), over real TLS on loopback with a private
reactor, a real ``BlobStore`` and real fills fed by bodies the tests pace."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, maybeDeferred, succeed
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import tls
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from mirrord.daemon.tls import ServerTLS, make_context
from mirrord.fleet.endpoint import FleetResource
from mirrord.fleet.peer import PeerClient, PeerUnavailable, parse_meta, trust
from mirrord.fleet.secret import FleetSecret
from mirrord.store import shared
from mirrord.store.disk import BlobStore, Meta
from mirrord.store.fill import Fill
from mirrord.store.follow import RemoteFill
from mirrord.store.inflight import InFlight
from mirrord.store.worker import InlineHasher
from mirrord.tuning import LargeWriteTLSFactory
from mirrord.upstream.bodies import read_small_body
from tests.support.blobs import Collector
from tests.support.pki import Pki, make_pki

KEY = b"0123456789abcdef-fleet-test-key"
META = Meta("application/vnd.oci.image.layer.v1.tar+gzip", "library/alpine", True, "docker.io")


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _Large(Collector):
    """Reads a large body into a bytearray (appending to ``bytes`` is quadratic)."""

    def __init__(self) -> None:
        super().__init__()
        self.received = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.received += data


# The signature.


def test_load_strips_whitespace_and_refuses_short_keys(tmp_path: Path) -> None:
    """A key file's surrounding whitespace is not part of the key; a key
    under 16 bytes is refused, with a message that does not show it."""
    good = tmp_path / "good"
    good.write_bytes(b"  " + KEY + b"\n")
    signed = FleetSecret.load(str(good)).sign(b"GET", b"/x", 1000.0)
    assert FleetSecret(KEY).verify(signed, b"GET", b"/x", 1000.0)
    short = tmp_path / "short"
    short.write_bytes(b"  tiny-secret \n")
    try:
        FleetSecret.load(str(short))
    except ValueError as e:
        assert "16" in str(e) and "tiny" not in str(e)
    else:
        raise AssertionError("a 11-byte key was accepted")
    assert "0123" not in repr(FleetSecret(KEY))


def test_signature_has_the_documented_form() -> None:
    """``MirrordFleet <ts>:<hex hmac-sha256 of ts, method, path>``."""
    import hmac

    value = FleetSecret(KEY).sign(b"GET", b"/_mirrord/fleet/health", 1700000000.7)
    mac = hmac.new(KEY, b"1700000000\nGET\n/_mirrord/fleet/health", hashlib.sha256).hexdigest()
    assert value == b"MirrordFleet 1700000000:" + mac.encode()


_methods = st.sampled_from([b"GET", b"HEAD", b"POST", b"get"])
_paths = st.binary(min_size=1, max_size=120)
_times = st.integers(min_value=1_000_000_000, max_value=4_000_000_000)


@settings(max_examples=200, deadline=None)
@given(method=_methods, path=_paths, now=_times, other=_paths, drift=st.floats(-60, 60))
def test_verify_accepts_its_own_signature_only_for_what_it_signed(
    method: bytes, path: bytes, now: int, other: bytes, drift: float
) -> None:
    """A signature verifies for its method and path within the skew, and
    for no other path, method or key."""
    secret = FleetSecret(KEY)
    signed = secret.sign(method, path, now)
    assert secret.verify(signed, method, path, now + drift)
    if other != path:
        assert not secret.verify(signed, method, other, now)
    for wrong in (b"GET", b"HEAD", b"DELETE"):
        if wrong != method:
            assert not secret.verify(signed, wrong, path, now)
    assert not FleetSecret(KEY + b"!").verify(signed, method, path, now)


@settings(max_examples=200, deadline=None)
@given(now=_times, late=st.floats(60.001, 1e6), early=st.booleans(), skew=st.floats(1, 600))
def test_verify_refuses_signatures_outside_the_skew(
    now: int, late: float, early: bool, skew: float
) -> None:
    """A signature made more than ``skew`` seconds from now (either way) fails."""
    secret = FleetSecret(KEY)
    signed = secret.sign(b"GET", b"/p", now)
    assert not secret.verify(signed, b"GET", b"/p", now + (-late if early else late))
    offset = skew * 0.99
    assert secret.verify(signed, b"GET", b"/p", now + offset, skew=skew)
    assert not secret.verify(signed, b"GET", b"/p", now + skew + 1, skew=skew)


@settings(max_examples=300, deadline=None)
@given(now=_times, position=st.integers(0, 200), byte=st.integers(0, 255))
def test_verify_refuses_any_tampered_byte(now: int, position: int, byte: int) -> None:
    """Changing any byte of the header (timestamp, separator or MAC) fails it."""
    secret = FleetSecret(KEY)
    signed = bytearray(secret.sign(b"GET", b"/p", now))
    position %= len(signed)
    if signed[position] == byte:
        return
    signed[position] = byte
    tampered = bytes(signed)
    if tampered.strip() == secret.sign(b"GET", b"/p", now):
        return  # only whitespace around it changed
    assert not secret.verify(tampered, b"GET", b"/p", now)


@settings(max_examples=100, deadline=None)
@given(now=_times, shift=st.integers(1, 30))
def test_verify_refuses_a_timestamp_moved_within_the_skew(now: int, shift: int) -> None:
    """A timestamp changed, even to one still within the skew, breaks the MAC."""
    secret = FleetSecret(KEY)
    _, _, rest = secret.sign(b"GET", b"/p", now).partition(b" ")
    mac = rest.partition(b":")[2]
    moved = b"MirrordFleet %d:%s" % (now + shift, mac)
    assert not secret.verify(moved, b"GET", b"/p", now)
    assert not secret.verify(None, b"GET", b"/p", now)
    assert not secret.verify(b"", b"GET", b"/p", now)


# The endpoint and the client, on loopback.


class _Hosts(SynchronousTestCase):
    """A host's fleet endpoint on a real TLS listener, read by another's
    ``PeerClient``; both on a private reactor the test iterates."""

    start_wait = 30.0

    def setUp(self) -> None:
        self.reactor = EPollReactor()
        # TLS connections aggregate small writes until a turn of the global
        # reactor, which never runs here: give them this one.
        self.patch(tls, "_get_default_clock", lambda: self.reactor)
        # HostnameEndpoint resolves in the reactor's thread pool.
        threads = self.reactor.getThreadPool()
        threads.start()
        self.addCleanup(threads.stop)
        tmp = Path(tempfile.mkdtemp())
        self.pki = make_pki(tmp / "pki")
        self.store = BlobStore(tmp / "cache", 1 << 30)
        self.in_flight = InFlight()
        self.secret = FleetSecret(KEY)
        self.data = os.urandom(600_000)
        self.digest = _digest(self.data)
        self.resource = FleetResource(
            self.secret,
            self.store,
            self.in_flight,
            self.reactor,
            30.0,
            maybeDeferred,
            start_wait=self.start_wait,
        )
        self.port = self.listen("127.0.0.1", self.pki)
        self.advertise = f"https://127.0.0.1:{self.port.getHost().port}"
        self.client = PeerClient(self.reactor, self.secret, str(self.pki.ca), deadline=5.0)
        self.raw = Agent(self.reactor, contextFactory=trust(str(self.pki.ca)))

    def listen(self, interface: str, pki: Pki) -> Any:
        root, inner = Resource(), Resource()
        root.putChild(b"_mirrord", inner)
        inner.putChild(b"fleet", self.resource)
        tls = ServerTLS(make_context(pki.fullchain, pki.privkey, "1.2", "ECDHE+AESGCM"))
        port = self.reactor.listenTCP(
            0,
            LargeWriteTLSFactory(tls, False, Site(root, reactor=self.reactor)),
            interface=interface,
        )
        self.addCleanup(port.stopListening)
        return port

    def tearDown(self) -> None:
        closing = self.client.close()
        self.run_until(lambda: closing.called)
        self.reactor.disconnectAll()
        self.reactor.removeAll()
        self.reactor.iterate(0)
        self.reactor.waker.connectionLost(None)
        self.reactor._poller.close()

    def run_until(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            self.assertLess(time.monotonic(), deadline, "timed out on loopback")
            self.reactor.iterate(0.01)

    def run_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.reactor.iterate(0.01)

    def wait(self, d: Deferred[Any]) -> Deferred[Any]:
        """``d``, once it has a result (not merely called: it may be
        chained to another Deferred still waiting)."""
        outcome: list[object] = []

        def seen(result: object) -> object:
            outcome.append(result)
            return result

        d.addBoth(seen)
        self.run_until(lambda: bool(outcome))
        return d

    def get_blob(self, offset: int = 0, digest: str | None = None) -> Deferred[Any]:
        return self.wait(
            ensureDeferred(self.client.get_blob(self.advertise, digest or self.digest, offset))
        )

    def read(self, response: Any) -> Collector:
        body = Collector()
        response.deliverBody(body)
        self.run_until(lambda: body.ended)
        return body

    def raw_get(
        self, path: str, sign: float | None = None, method: bytes = b"GET", **headers: str
    ) -> tuple[Any, bytes]:
        """A request as any client could make it; signed at ``sign`` if given."""
        raw = Headers({k.replace("_", "-").encode(): [v.encode()] for k, v in headers.items()})
        if sign is not None:
            raw.setRawHeaders(b"authorization", [self.secret.sign(method, path.encode(), sign)])
        asked = self.raw.request(method, (self.advertise + path).encode(), raw)
        response = self.successResultOf(self.wait(asked))
        body = self.successResultOf(self.wait(read_small_body(response, self.reactor, 5.0)))
        return response, body

    def publish(self) -> None:
        self.store.put_bytes(self.digest, self.data, META)

    def start_fill(self, size: int | None = None) -> Fill:
        """A running fill of the blob in the in-flight table, fed by the test."""
        fill = Fill(
            self.store, InlineHasher("sha256"), self.digest, META, size, Clock(), 30.0, 30.0
        )
        fill.makeConnection(StringTransport())
        self.in_flight.start(self.digest, succeed(fill), lambda o: o, lambda o: None)
        self.assertIs(self.in_flight.get(self.digest), fill)
        return fill

    def fill_in_another_process(self) -> Callable[[], None]:
        """Another process of this host (its own store on the same root)
        filling the blob: its first 250,000 bytes written; call the result
        to write the rest and publish it."""
        filler = BlobStore(self.store.root, 1 << 30)
        claim = filler.claim(self.digest)
        self.assertTrue(claim.locked)
        temp = filler.new_temp(len(self.data), claim)
        about = {"meta": dataclasses.asdict(META), "size": len(self.data)}
        shared.describe(claim, about)
        temp.write(self.data[:250_000])

        def finish() -> None:
            temp.write(self.data[250_000:])
            filler.commit(temp, self.digest, json.dumps(about["meta"]).encode(), 1.0)
            temp.discard()

        return finish

    def assert_followed_to_the_end(self, finish: Callable[[], None]) -> None:
        """The peer gets the bytes there as the file grows, and the whole
        blob once ``finish`` published it."""
        response, meta = self.successResultOf(self.get_blob())
        self.assertEqual((response.code, meta, response.length), (200, META, len(self.data)))
        body = Collector()
        response.deliverBody(body)
        self.run_until(lambda: len(body.data) >= 250_000)
        self.assertFalse(body.ended)
        finish()
        self.run_until(lambda: body.ended)
        body.reason.trap(ResponseDone)
        self.assertEqual(body.data, self.data)

    def assert_cut(self, body: Collector) -> None:
        self.assertIsNotNone(body.reason)
        self.assertIsNone(
            body.reason.check(ResponseDone, PotentialDataLoss),
            f"a failed fill ended the peer's body cleanly: {body.reason!r}",
        )
        self.assertLess(len(body.data), len(self.data))
        self.assertEqual(body.data, self.data[: len(body.data)])


class FleetLoopbackTests(_Hosts):
    """The endpoint and the client, end to end on loopback TLS."""

    # Authentication and refusals.

    def test_unsigned_bad_and_stale_requests_are_refused_before_anything_is_read(self) -> None:
        """No signature, a wrong one, a stale one, or one for another path:
        401 with the registry's JSON error, and no byte of the blob."""
        self.publish()
        path = f"/_mirrord/fleet/blobs/{self.digest}"
        now = self.reactor.seconds()
        other = FleetSecret(b"another fleet's key, 32 bytes..")
        cases = {
            "unsigned": {},
            "stale": {"authorization": self.secret.sign(b"GET", path.encode(), now - 120).decode()},
            "future": {
                "authorization": self.secret.sign(b"GET", path.encode(), now + 120).decode()
            },
            "other key": {"authorization": other.sign(b"GET", path.encode(), now).decode()},
            "other path": {"authorization": self.secret.sign(b"GET", b"/x", now).decode()},
            "garbage": {"authorization": "MirrordFleet nonsense"},
        }
        for why, headers in cases.items():
            response, body = self.raw_get(path, **headers)
            self.assertEqual(response.code, 401, why)
            self.assertEqual(json.loads(body)["errors"][0]["code"], "UNAUTHORIZED", why)
            self.assertNotIn(self.data[:64], body)
            self.assertFalse(response.headers.hasHeader(b"docker-content-digest"), why)
        self.assertEqual(self.store.entries[self.digest].readers, 0)
        # Even a malformed digest is a 401 to a caller without the key.
        response, _ = self.raw_get("/_mirrord/fleet/blobs/sha256:nothex")
        self.assertEqual(response.code, 401)

    def test_client_with_another_key_is_unavailable(self) -> None:
        """A host with the wrong key gets ``PeerUnavailable`` naming the 401."""
        self.publish()
        wrong = PeerClient(self.reactor, FleetSecret(b"x" * 32), str(self.pki.ca))
        self.addCleanup(wrong.close)
        d = self.wait(ensureDeferred(wrong.get_blob(self.advertise, self.digest)))
        self.assertIn("401", str(self.failureResultOf(d, PeerUnavailable).value))
        self.assertFalse(
            self.successResultOf(self.wait(ensureDeferred(wrong.health(self.advertise))))
        )

    def test_unknown_digest_is_404_and_unavailable(self) -> None:
        """A blob this host neither holds nor fills: 404, ``PeerUnavailable``."""
        failure = self.failureResultOf(self.get_blob(), PeerUnavailable)
        self.assertIn("404", str(failure.value))
        response, body = self.raw_get(
            f"/_mirrord/fleet/blobs/{self.digest}", sign=self.reactor.seconds()
        )
        self.assertEqual(response.code, 404)
        self.assertEqual(json.loads(body)["errors"][0]["code"], "BLOB_UNKNOWN")

    def test_malformed_digests_are_400(self) -> None:
        """Only ``sha256:`` and 64 lowercase hex digits name a blob: 400 JSON."""
        hexdigest = self.digest.split(":", 1)[1]
        for bad in (
            "sha256:" + hexdigest.upper(),
            "sha256:" + hexdigest[:-1],
            "sha256:" + hexdigest + "0",
            "sha512:" + hexdigest,
            "sha256:" + hexdigest[:-1] + "g",
            "..%2f..%2fetc",
        ):
            response, body = self.raw_get(
                f"/_mirrord/fleet/blobs/{bad}", sign=self.reactor.seconds()
            )
            self.assertEqual(response.code, 400, bad)
            self.assertEqual(json.loads(body)["errors"][0]["code"], "DIGEST_INVALID", bad)

    def test_health(self) -> None:
        """An authenticated health check answers 200 {"ok": true}."""
        response, body = self.raw_get("/_mirrord/fleet/health", sign=self.reactor.seconds())
        self.assertEqual((response.code, json.loads(body)), (200, {"ok": True}))
        healthy = self.wait(ensureDeferred(self.client.health(self.advertise)))
        self.assertTrue(self.successResultOf(healthy))

    def test_nothing_listening_is_unavailable(self) -> None:
        """A host that is down: ``PeerUnavailable``, and unhealthy."""
        port = self.port.getHost().port
        self.successResultOf(self.wait(maybeDeferred(self.port.stopListening)))
        failure = self.failureResultOf(self.get_blob(), PeerUnavailable)
        self.assertIn(f"127.0.0.1:{port}", str(failure.value))
        self.assertFalse(
            self.successResultOf(self.wait(ensureDeferred(self.client.health(self.advertise))))
        )

    def test_peer_that_never_answers_is_unavailable_after_the_deadline(self) -> None:
        """A host that accepts the connection and says nothing: ``PeerUnavailable``
        once the deadline passed, not a wait without end."""
        silent = self.reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        hasty = PeerClient(self.reactor, self.secret, str(self.pki.ca), deadline=0.3)
        self.addCleanup(hasty.close)
        started = time.monotonic()
        asked = hasty.get_blob(f"https://127.0.0.1:{silent.getHost().port}", self.digest)
        failure = self.failureResultOf(self.wait(ensureDeferred(asked)), PeerUnavailable)
        self.assertIn("within 0.3s", str(failure.value))
        self.assertLess(time.monotonic() - started, 3.0)

    def test_peer_certificate_must_name_the_advertised_host_and_chain_to_the_ca(self) -> None:
        """A certificate for another address, or from a CA not trusted:
        ``PeerUnavailable``, nothing read."""
        self.publish()
        elsewhere = self.listen("127.0.0.2", self.pki)  # the cert names 127.0.0.1
        wrong_host = f"https://127.0.0.2:{elsewhere.getHost().port}"
        d = self.wait(ensureDeferred(self.client.get_blob(wrong_host, self.digest)))
        self.failureResultOf(d, PeerUnavailable)
        stranger = make_pki(Path(tempfile.mkdtemp()))
        distrustful = PeerClient(self.reactor, self.secret, str(stranger.ca))
        self.addCleanup(distrustful.close)
        d = self.wait(ensureDeferred(distrustful.get_blob(self.advertise, self.digest)))
        self.failureResultOf(d, PeerUnavailable)
        self.assertEqual(self.store.entries[self.digest].readers, 0)

    # A published blob.

    def test_published_blob_streams_whole_with_its_headers(self) -> None:
        """A published blob: 200, its bytes, length, media type, digest and Meta."""
        self.publish()
        response, meta = self.successResultOf(self.get_blob())
        self.assertEqual(response.code, 200)
        self.assertEqual(meta, META)
        self.assertEqual(response.length, len(self.data))
        header = response.headers.getRawHeaders
        self.assertEqual(header(b"content-type"), [META.media_type.encode()])
        self.assertEqual(header(b"docker-content-digest"), [self.digest.encode()])
        self.assertEqual(parse_meta(header(b"x-mirrord-meta")[0]), META)
        self.assertFalse(response.headers.hasHeader(b"content-encoding"))
        body = self.read(response)
        body.reason.trap(ResponseDone)
        self.assertEqual(body.data, self.data)
        self.assertEqual(self.store.entries[self.digest].readers, 0)

    def test_slow_peer_holds_the_stream_and_its_lease(self) -> None:
        """A peer that stops reading pauses the stream (the blob stays in
        the file, not in memory) under the entry's reader lease; it gets
        the rest when it reads again, and the lease goes at the end."""
        self.data = os.urandom(32 << 20)
        self.digest = _digest(self.data)
        self.publish()
        response, _ = self.successResultOf(self.get_blob())
        body = _Large()
        response.deliverBody(body)
        # Not in connectionMade: Twisted resumes the transport right after it.
        body.transport.pauseProducing()
        self.run_for(0.5)
        self.assertLess(len(body.received), len(self.data) // 2)
        self.assertEqual(self.store.entries[self.digest].readers, 1, "no reader lease held")
        body.transport.resumeProducing()
        self.run_until(lambda: body.ended)
        body.reason.trap(ResponseDone)
        self.assertEqual(body.received, self.data)
        self.assertEqual(self.store.entries[self.digest].readers, 0)

    def test_published_blob_from_an_offset(self) -> None:
        """``offset``: 206 from exactly that byte, with its Content-Range."""
        self.publish()
        offset = 123_457
        response, meta = self.successResultOf(self.get_blob(offset))
        self.assertEqual((response.code, meta), (206, META))
        self.assertEqual(
            response.headers.getRawHeaders(b"content-range"),
            [b"bytes %d-%d/%d" % (offset, len(self.data) - 1, len(self.data))],
        )
        self.assertEqual(response.length, len(self.data) - offset)
        body = self.read(response)
        body.reason.trap(ResponseDone)
        self.assertEqual(body.data, self.data[offset:])
        # Past the end: 416, unavailable.
        self.failureResultOf(self.get_blob(len(self.data)), PeerUnavailable)

    def test_head_sends_headers_only(self) -> None:
        """HEAD: the GET's headers, no body, no lease left behind."""
        self.publish()
        path = f"/_mirrord/fleet/blobs/{self.digest}"
        response, body = self.raw_get(path, sign=self.reactor.seconds(), method=b"HEAD")
        self.assertEqual((response.code, body), (200, b""))
        self.assertEqual(
            response.headers.getRawHeaders(b"content-length"), [b"%d" % len(self.data)]
        )
        self.assertEqual(self.store.entries[self.digest].readers, 0)

    def test_only_resume_ranges_are_taken(self) -> None:
        """A Range other than ``bytes=N-`` is refused (416), not misread."""
        self.publish()
        path = f"/_mirrord/fleet/blobs/{self.digest}"
        for value in ("bytes=0-10", "bytes=-5", "items=3-", "bytes=1-,5-"):
            response, _ = self.raw_get(path, sign=self.reactor.seconds(), range=value)
            self.assertEqual(response.code, 416, value)

    # A fill in progress.

    def test_running_fill_is_followed_while_it_grows(self) -> None:
        """A fill in progress: the peer gets its first bytes before the fill
        ends and the whole blob, cleanly ended, once it is verified."""
        fill = self.start_fill(len(self.data))
        fill.dataReceived(self.data[:200_000])
        response, meta = self.successResultOf(self.get_blob())
        self.assertEqual((response.code, meta, response.length), (200, META, len(self.data)))
        body = Collector()
        response.deliverBody(body)
        self.run_until(lambda: len(body.data) >= 200_000)
        self.assertEqual(body.data, self.data[:200_000])
        self.assertFalse(body.ended)
        fill.dataReceived(self.data[200_000:])
        fill.connectionLost(Failure(ResponseDone()))
        self.run_until(lambda: body.ended)
        body.reason.trap(ResponseDone)
        self.assertEqual(body.data, self.data)
        self.assertIsNotNone(fill.entry)

    def test_running_fill_from_an_offset(self) -> None:
        """A resume into a running fill: 206 from the offset, the rest as it comes."""
        fill = self.start_fill(len(self.data))
        fill.dataReceived(self.data[:200_000])
        response, _ = self.successResultOf(self.get_blob(150_000))
        self.assertEqual(response.code, 206)
        body = Collector()
        response.deliverBody(body)
        self.run_until(lambda: len(body.data) >= 50_000)
        fill.dataReceived(self.data[200_000:])
        fill.connectionLost(Failure(ResponseDone()))
        self.run_until(lambda: body.ended)
        body.reason.trap(ResponseDone)
        self.assertEqual(body.data, self.data[150_000:])

    def test_fill_failing_mid_body_cuts_the_peer(self) -> None:
        """The fill's upstream fails mid-body: the peer's body ends in a
        failure, never a clean short body."""
        fill = self.start_fill(len(self.data))
        fill.dataReceived(self.data[:200_000])
        response, _ = self.successResultOf(self.get_blob())
        body = Collector()
        response.deliverBody(body)
        self.run_until(lambda: len(body.data) >= 200_000)
        fill.connectionLost(Failure(ConnectionLost()))
        self.run_until(lambda: body.ended)
        self.assert_cut(body)

    def test_fill_of_unknown_size_is_chunked_and_cut_on_failure(self) -> None:
        """A fill whose upstream sent no length: no Content-Length; its
        failure cuts the chunked body, which never ends cleanly."""
        fill = self.start_fill(None)
        fill.dataReceived(self.data[:100_000])
        response, _ = self.successResultOf(self.get_blob())
        self.assertEqual(response.code, 200)
        self.assertFalse(response.headers.hasHeader(b"content-length"))
        body = Collector()
        response.deliverBody(body)
        self.run_until(lambda: len(body.data) >= 100_000)
        fill.connectionLost(Failure(ConnectionLost()))
        self.run_until(lambda: body.ended)
        self.assert_cut(body)

    def test_fill_of_unknown_size_completes_chunked(self) -> None:
        """A fill without a length streams chunked and ends cleanly once verified."""
        fill = self.start_fill(None)
        fill.dataReceived(self.data[:100_000])
        response, _ = self.successResultOf(self.get_blob())
        body = Collector()
        response.deliverBody(body)
        self.run_until(lambda: len(body.data) >= 100_000)
        fill.dataReceived(self.data[100_000:])
        fill.connectionLost(Failure(ResponseDone()))
        self.run_until(lambda: body.ended)
        body.reason.trap(ResponseDone)
        self.assertEqual(body.data, self.data)

    def test_fill_whose_disk_fails_cuts_the_peer(self) -> None:
        """This host's disk fails the fill mid-body: the peer is cut (it has
        no upstream to finish from here), never sent a clean short body."""
        fill = self.start_fill(len(self.data))
        fill.dataReceived(self.data[:200_000])
        response, _ = self.successResultOf(self.get_blob())
        body = Collector()
        response.deliverBody(body)
        self.run_until(lambda: len(body.data) >= 200_000)
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fill.temp._fd)
        os.close(full)
        fill.dataReceived(self.data[200_000:300_000])
        self.assertTrue(fill.store_failed)
        self.run_until(lambda: body.ended)
        self.assert_cut(body)

    def test_another_process_fill_is_followed_from_its_descriptor(self) -> None:
        """A fill another process of this host runs (a ``RemoteFill`` in the
        table): the peer gets its bytes as that file grows, and the whole
        blob once the other process published it."""
        finish = self.fill_in_another_process()
        following = self.store.claim(self.digest)
        self.assertFalse(following.locked)
        remote = RemoteFill(
            self.store, following, self.digest, maybeDeferred, self.reactor, 5.0, 60.0
        )
        self.successResultOf(self.wait(remote.start()))
        self.in_flight.start(self.digest, succeed(remote), lambda o: o, lambda o: None)
        self.assert_followed_to_the_end(finish)

    def test_another_worker_fill_unknown_here_is_found_and_followed(self) -> None:
        """The lease names the host, not the worker: a request reaching a
        worker that has never heard of the fill another worker runs finds
        it by its lock on disk and follows it to the whole blob."""
        finish = self.fill_in_another_process()
        self.assertIsNone(self.in_flight.get(self.digest))
        self.assert_followed_to_the_end(finish)

    def test_a_request_gone_while_the_lock_is_taken_leaves_no_lock(self) -> None:
        """The disk worker takes the fill lock after the asking member has
        gone (its request cancelled meanwhile): the lock is let go at once,
        so this host's next fill of the digest is not left waiting on it."""
        queued: list[Callable[[], None]] = []

        def later(f: Any, *args: Any) -> Deferred[Any]:
            """As the disk worker does: the work runs when its turn comes,
            whether or not its caller still waits for the result."""
            d: Deferred[Any] = Deferred()
            queued.append(lambda: d.callback(f(*args)))
            return d

        resource = FleetResource(self.secret, self.store, self.in_flight, self.reactor, 30.0, later)
        asking = resource._claim(self.digest)
        asking.cancel()
        self.failureResultOf(asking, CancelledError)
        queued.pop(0)()  # the worker takes the lock now
        while queued:  # and lets it go
            queued.pop(0)()
        claim = self.store.claim(self.digest)
        self.assertTrue(claim.locked)
        claim.release()

    def test_nobody_filling_is_404_and_leaves_no_lock(self) -> None:
        """No fill anywhere on this host: 404, and the look took no lock
        that would stop this host's next fill."""
        self.assertIn("404", str(self.failureResultOf(self.get_blob(), PeerUnavailable).value))
        claim = self.store.claim(self.digest)
        self.assertTrue(claim.locked)
        claim.release()

    def test_fill_still_starting_is_waited_for_then_followed(self) -> None:
        """A fill waiting for its upstream's headers: the request waits,
        then follows the fill it became."""
        work: Deferred[Fill] = Deferred()
        self.in_flight.start(self.digest, work, lambda o: o, lambda o: None)
        asked = ensureDeferred(self.client.get_blob(self.advertise, self.digest))
        self.run_for(0.2)
        self.assertFalse(asked.called)
        fill = Fill(
            self.store, InlineHasher("sha256"), self.digest, META, len(self.data), Clock(), 30, 30
        )
        fill.makeConnection(StringTransport())
        fill.dataReceived(self.data[:1000])
        work.callback(fill)
        response, _ = self.successResultOf(self.wait(asked))
        body = Collector()
        response.deliverBody(body)
        fill.dataReceived(self.data[1000:])
        fill.connectionLost(Failure(ResponseDone()))
        self.run_until(lambda: body.ended)
        body.reason.trap(ResponseDone)
        self.assertEqual(body.data, self.data)

    def test_start_that_becomes_nothing_is_404(self) -> None:
        """A start whose upstream refused (no fill came of it): 404."""
        work: Deferred[object] = Deferred()
        self.in_flight.start(self.digest, work, lambda o: None, lambda o: None)
        asked = ensureDeferred(self.client.get_blob(self.advertise, self.digest))
        self.run_for(0.1)
        work.callback("an upstream 503")
        self.assertIn("404", str(self.failureResultOf(self.wait(asked), PeerUnavailable).value))


class StartBoundTests(_Hosts):
    """The same host with a short bound on a fill's start."""

    start_wait = 0.3

    def test_start_that_never_settles_is_503_in_bounded_time(self) -> None:
        """A fill whose upstream never answers: 503 after the bound, unavailable."""
        self.in_flight.start(self.digest, Deferred(), lambda o: o, lambda o: None)
        failure = self.failureResultOf(self.get_blob(), PeerUnavailable)
        self.assertIn("503", str(failure.value))
