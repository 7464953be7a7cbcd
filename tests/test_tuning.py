"""Guards for the throughput tweaks in mirrord.tuning: they lean on Twisted
internals, so these tests fail loudly if Twisted changes underneath."""

from __future__ import annotations

import hashlib
import inspect
import os
import tempfile
from pathlib import Path

from twisted.internet import abstract, tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from mirrord import tuning
from mirrord.tls import ServerTLS, ensure_self_signed, make_context


class TwistedInternalsTests(SynchronousTestCase):
    def test_tls_protocol_internals_exist(self) -> None:
        """The TLS methods and attributes LargeWriteTLSProtocol overrides or calls are there."""
        for name in ("_write", "_flushSendBIO", "_bufferedWrite", "_tlsShutdownFinished"):
            self.assertTrue(callable(getattr(TLSMemoryBIOProtocol, name, None)), name)
        source = inspect.getsource(TLSMemoryBIOProtocol)
        for name in (
            "self._lostTLSConnection",
            "self._tlsConnection",
            "self._flushSendBIO()",
            "def _flushReceiveBIO",
            "self._flushReceiveBIO()",
            "self._aborted",
            "def _shutdownTLS",
        ):
            self.assertIn(name, source)

    def test_pyopenssl_memory_bio_is_reachable(self) -> None:
        """_Ciphertext reads the memory BIO of a pyOpenSSL Connection directly."""
        from OpenSSL import SSL
        from OpenSSL._util import lib

        connection = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        self.assertIsNotNone(connection._from_ssl)
        self.assertTrue(callable(lib.BIO_read))

    def test_write_buffer_internals_exist(self) -> None:
        """send_room counts what Twisted still holds from these attributes."""
        source = inspect.getsource(abstract.FileDescriptor)
        for name in ("self._tempDataLen", "self.dataBuffer", "self.offset"):
            self.assertIn(name, source)

    def test_socket_knobs_are_read_per_instance(self) -> None:
        """tcp reads bufferSize and sends SEND_LIMIT from the instance, so setting them works."""
        self.assertIn("self.bufferSize", inspect.getsource(tcp.Connection.doRead))
        self.assertIn("self.SEND_LIMIT", inspect.getsource(tcp.Connection.writeSomeData))
        self.assertIn("self.SEND_LIMIT", inspect.getsource(abstract.FileDescriptor.doWrite))


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
