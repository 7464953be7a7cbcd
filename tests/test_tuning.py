"""Guards for the throughput tweaks in mirrord.tuning: they lean on Twisted
internals, so these tests fail loudly if Twisted changes underneath."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from twisted.internet import abstract
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI, BrowserLikePolicyForHTTPS

from mirrord import tuning
from mirrord.daemon.tls import ServerTLS, ensure_self_signed, make_context
from tests.support.pki import make_pki


class _Recorder(Protocol):
    """The application above the upstream TLS layer: what it got, in what pieces."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.pieces: list[int] = []
        self.ended = False

    def dataReceived(self, data: bytes) -> None:
        self.hash.update(data)
        self.pieces.append(len(data))

    def connectionLost(self, reason: object = None) -> None:
        self.ended = True


class LoopbackTests(SynchronousTestCase):
    """The tuned TLS server and upstream client on a real loopback TCP
    connection, driven by a private reactor: what the knobs in
    ``mirrord.tuning`` must do on a real socket. They set Twisted internals
    (``bufferSize``, ``SEND_LIMIT``, the TLS layer's BIO handling); if
    Twisted stops honouring them these fail, where a look at Twisted's
    source would not."""

    def setUp(self) -> None:
        self.reactor = EPollReactor()
        # HostnameEndpoint resolves in the reactor's thread pool, which
        # starts only when a reactor runs: this one is only iterated.
        pool = self.reactor.getThreadPool()
        pool.start()
        self.addCleanup(pool.stop)

    def tearDown(self) -> None:
        self.reactor.disconnectAll()
        self.reactor.removeAll()
        self.reactor.iterate(0)
        self.reactor.waker.connectionLost(None)
        self.reactor._poller.close()

    def run_until(self, done: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            self.assertLess(time.monotonic(), deadline, "timed out on loopback")
            self.reactor.iterate(0.01)

    def test_tuned_tls_on_loopback(self) -> None:
        """16 MiB from the tuned TLS server reach the tuned upstream client intact,
        in pieces far larger than Twisted's 64 KiB reads and 128 KiB sends allow."""
        pki = make_pki(Path(tempfile.mkdtemp()))
        payload = os.urandom(16 << 20)
        servers: list[tuning.LargeWriteTLSProtocol] = []

        def server_made(protocol: tuning.LargeWriteTLSProtocol) -> None:
            servers.append(protocol)

        server_factory = tuning.LargeWriteTLSFactory(
            ServerTLS(make_context(pki.fullchain, pki.privkey, "1.2", "ECDHE+AESGCM")),
            False,
            Factory.forProtocol(lambda: _Sender(payload)),
        )
        port = self.reactor.listenTCP(0, server_factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        policy = BrowserLikePolicyForHTTPS(Certificate.loadPEM(pki.ca.read_bytes()))
        endpoints = tuning.UpstreamEndpoints(self.reactor, policy, 10)
        uri = URI.fromBytes(b"https://127.0.0.1:%d/" % port.getHost().port)
        recorder = _Recorder()
        connected = endpoints.endpointForURI(uri).connect(Factory.forProtocol(lambda: recorder))
        self.run_until(lambda: recorder.ended)
        protocol = self.successResultOf(connected)
        self.assertIs(protocol, recorder)
        self.assertEqual(sum(recorder.pieces), len(payload))
        self.assertEqual(recorder.hash.digest(), hashlib.sha256(payload).digest())
        # Each piece is what one socket read decrypted (GatheringTLSProtocol):
        # with Twisted's own 64 KiB reads, or its 128 KiB per send, none
        # could be much over 128 KiB.
        self.assertGreater(max(recorder.pieces), 512 << 10, recorder.pieces[:20])
        self.assertLessEqual(max(recorder.pieces), tuning.READ_SIZE)

    def test_pyopenssl_memory_bio_is_reachable(self) -> None:
        """_Ciphertext reads the memory BIO of a pyOpenSSL Connection directly."""
        from OpenSSL import SSL
        from OpenSSL._util import lib

        connection = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        self.assertIsNotNone(connection._from_ssl)
        self.assertTrue(callable(lib.BIO_read))


class _Sender(Protocol):
    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def connectionMade(self) -> None:
        for offset in range(0, len(self.payload), 3 << 20):
            self.transport.write(self.payload[offset : offset + (3 << 20)])
        self.transport.loseConnection()


class _Collector(Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)


class _CountingTransport(iosim.FakeTransport):
    """Records the size of every write the TLS layer makes to its socket."""

    def __init__(self, protocol: Protocol, isServer: bool) -> None:
        super().__init__(protocol, isServer)
        self.write_sizes: list[int] = []

    def write(self, data: bytes) -> None:
        self.write_sizes.append(len(data))
        super().write(data)


def _through_tls(
    payload: bytes,
    client_factory_class: type = TLSMemoryBIOFactory,
    socket_writes: list[int] | None = None,
) -> list[bytes]:
    """Send ``payload`` from a LargeWriteTLSProtocol server to a client made
    by ``client_factory_class``, in memory; the pieces the client's
    application received. ``socket_writes`` collects the sizes of the
    server's writes to its socket."""
    cert, key, _ = ensure_self_signed(Path(tempfile.mkdtemp()))
    server_factory = tuning.LargeWriteTLSFactory(
        ServerTLS(make_context(cert, key, "1.2", "ECDHE+AESGCM")),
        False,
        Factory.forProtocol(lambda: _Sender(payload)),
    )
    collector = _Collector()
    client_factory = client_factory_class(
        optionsForClientTLS("localhost", Certificate.loadPEM(cert.read_bytes())),
        True,
        Factory.forProtocol(lambda: collector),
    )
    server = server_factory.buildProtocol(None)
    client = client_factory.buildProtocol(None)
    assert isinstance(server, tuning.LargeWriteTLSProtocol)
    server_transport = _CountingTransport(server, isServer=True)
    pump = iosim.connect(
        server,
        server_transport,
        client,
        iosim.FakeTransport(client, isServer=False),
    )
    pump.flush()
    if socket_writes is not None:
        socket_writes.extend(server_transport.write_sizes)
    return collector.chunks


class LargeWriteTLSTests(SynchronousTestCase):
    def test_large_writes_arrive_intact(self) -> None:
        """7 MiB written in 3 MiB pieces through LargeWriteTLSProtocol decrypt to the same bytes."""
        payload = os.urandom(7 << 20)
        received = b"".join(_through_tls(payload))
        self.assertEqual(len(received), len(payload))
        self.assertEqual(hashlib.sha256(received).digest(), hashlib.sha256(payload).digest())

    def test_ciphertext_reaches_the_socket_a_mebibyte_at_a_time(self) -> None:
        """Writes leave the TLS layer in pieces of about 1 MiB of ciphertext,
        not one per 64 KiB SSL_write (Twisted's transport would copy those
        into one before sending) and not a whole large write at once (the
        BIO would keep that much memory for the connection's life)."""
        writes: list[int] = []
        payload = os.urandom(7 << 20)
        received = b"".join(_through_tls(payload, socket_writes=writes))
        self.assertEqual(hashlib.sha256(received).digest(), hashlib.sha256(payload).digest())
        large = [size for size in writes if size > 64 << 10]
        # 3 + 3 + 1 MiB written: seven pieces of 1 MiB plus TLS overhead.
        self.assertEqual(len(large), 7)
        for size in large:
            self.assertGreaterEqual(size, tuning.TLS_FLUSH_SIZE)
            self.assertLess(size, tuning.TLS_FLUSH_SIZE + (64 << 10))

    def test_gathering_client_gets_few_large_pieces(self) -> None:
        """GatheringTLSProtocol delivers the same bytes, in pieces of many TLS records."""
        payload = os.urandom(7 << 20)
        chunks = _through_tls(payload, tuning.GatheringTLSFactory)
        received = b"".join(chunks)
        self.assertEqual(hashlib.sha256(received).digest(), hashlib.sha256(payload).digest())
        # One TLS record carries at most 16 KiB: anything bigger was gathered.
        self.assertGreater(max(len(chunk) for chunk in chunks), 256 << 10)
        self.assertLess(len(chunks), len(payload) // (64 << 10))

    def test_read_size_reaches_the_socket(self) -> None:
        """set_read_size finds the FileDescriptor under a TLS layer."""
        descriptor = abstract.FileDescriptor()
        tls = Protocol()
        tls.transport = descriptor
        application = Protocol()
        application.transport = tls
        tuning.set_read_size(application)
        self.assertEqual(descriptor.bufferSize, tuning.READ_SIZE)
