"""Throughput tweaks that reach below Twisted's public API, kept in one place.

Measured (``bench/``, ``../shared/PERF.md``): the cost of relaying a blob is
Python work per chunk. Twisted reads 64 KiB per ``recv`` and its TLS layer
cuts every write into 16 KiB ``SSL_write`` calls, each followed by a BIO read
and a transport write. Here upstream sockets read up to 2 MiB at a time and
the server's TLS layer encrypts 64 KiB per ``SSL_write`` and drains the
BIO once per MiB, so the socket gets 1 MiB pieces of ciphertext, which
about halves CPU per GiB. Backpressure is
unchanged: the transports still pause their producers when their buffers
fill.

``tests/test_tuning.py`` fails loudly if the Twisted internals used here
(``FileDescriptor.bufferSize`` and ``SEND_LIMIT``,
``TLSMemoryBIOProtocol._write`` and its helpers) change underneath.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

# Chosen by measurement on loopback (bench/): bigger reads are cheaper per
# byte; OpenSSL writes and BIO reads have a sweet spot well below that.
READ_SIZE = 2 << 20
SEND_SIZE = 1 << 20
TLS_WRITE_SIZE = 64 << 10
# Plaintext encrypted between two drains of the BIO, and a read size above
# its ciphertext, so each drain is one read.
TLS_FLUSH_SIZE = 1 << 20
TLS_BIO_READ_SIZE = 2 << 20
# Upstream TLS: decrypted records (16 KiB at most) are gathered into pieces
# of up to this size before they reach the HTTP parser.
TLS_GATHER_SIZE = 1 << 20
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def raise_mmap_threshold(size: int = 4 * READ_SIZE) -> None:
    """Keep large read buffers on the heap instead of a fresh mmap (and page
    faults) per read: glibc maps anything over 128 KiB by default and trims
    the heap's top after every large free. Harmless elsewhere."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(_M_MMAP_THRESHOLD, size)
        libc.mallopt(_M_TRIM_THRESHOLD, 8 * size)
    except (OSError, AttributeError):
        pass


class LargeWriteTLSProtocol(TLSMemoryBIOProtocol):
    """Server TLS with fewer, larger steps: 64 KiB per ``SSL_write``, the BIO
    drained once per MiB encrypted, and up to 1 MiB per ``send`` on the
    socket (Twisted sends 128 KiB per reactor iteration). Draining per MiB
    rather than per ``SSL_write`` hands the transport 16 times fewer pieces,
    which it would join (copy) before sending: measured with bench/run
    --rows, about 8-14 % less CPU per GiB on the proxy, cold and warm
    paths. Draining once per write would save the last join, but the BIO
    keeps its largest size for the connection's life: with 2 MiB writes,
    16 clients took peak RSS from about 105 to 150 MiB."""

    def makeConnection(self, transport: Any) -> None:
        if isinstance(transport, FileDescriptor):
            transport.SEND_LIMIT = SEND_SIZE
        super().makeConnection(transport)

    def _write(self, bytes: bytes) -> None:
        if self._lostTLSConnection:
            return
        sent_total = unflushed = 0
        # Slices of a memoryview are not copies (pyOpenSSL takes any buffer).
        view = memoryview(bytes)
        while sent_total < len(bytes):
            try:
                sent = self._tlsConnection.send(view[sent_total : sent_total + TLS_WRITE_SIZE])
            except WantReadError:
                self._bufferedWrite(bytes[sent_total:])
                break
            except Error:
                self._tlsShutdownFinished(Failure())
                break
            sent_total += sent
            unflushed += sent
            if unflushed >= TLS_FLUSH_SIZE:
                self._flushSendBIO()
                unflushed = 0
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        while True:
            try:
                data = self._tlsConnection.bio_read(TLS_BIO_READ_SIZE)
            except WantReadError:
                return
            self.transport.write(data)
            if len(data) < TLS_BIO_READ_SIZE:
                return


class LargeWriteTLSFactory(TLSMemoryBIOFactory):
    protocol = LargeWriteTLSProtocol


class GatheringTLSProtocol(TLSMemoryBIOProtocol):
    """Client TLS that hands the application everything decrypted from one
    socket read at once (up to ``TLS_GATHER_SIZE``), instead of one TLS
    record at a time: each piece costs a trip through the HTTP parser, the
    fill, the hasher and every reader. Measured with the benchmark's nginx
    as a TLS upstream (now bench/run's "mirrord proxy tls" row): the
    cache-off proxy went from about 435 to about 600 MB/s."""

    def _flushReceiveBIO(self) -> None:
        pieces: list[bytes] = []
        gathered = 0

        def deliver() -> None:
            nonlocal pieces, gathered
            ready, pieces, gathered = pieces, [], 0
            if ready and not self._aborted:
                ProtocolWrapper.dataReceived(self, b"".join(ready) if len(ready) > 1 else ready[0])

        while not self._lostTLSConnection:
            try:
                data = self._tlsConnection.recv(2**15)
            except WantReadError:
                break
            except ZeroReturnError:
                deliver()
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                failure = Failure()
                deliver()
                self._tlsShutdownFinished(failure)
            else:
                pieces.append(data)
                gathered += len(data)
                if gathered >= TLS_GATHER_SIZE:
                    deliver()
        deliver()
        self._flushSendBIO()


class GatheringTLSFactory(TLSMemoryBIOFactory):
    protocol = GatheringTLSProtocol


@implementer(IStreamClientEndpoint)
class _GatheringClientTLS:
    """``wrapClientTLS`` with ``GatheringTLSProtocol``."""

    def __init__(self, creator: Any, endpoint: IStreamClientEndpoint) -> None:
        self._creator = creator
        self._endpoint = endpoint

    def connect(self, factory: Any) -> Deferred[Any]:
        tls = GatheringTLSFactory(self._creator, True, factory)
        return self._endpoint.connect(tls).addCallback(lambda protocol: protocol.wrappedProtocol)


def set_read_size(protocol: Any, size: int = READ_SIZE) -> Any:
    """Make the socket under ``protocol`` (through any TLS layer) read ``size``
    bytes per ``recv``."""
    transport = getattr(protocol, "transport", None)
    while transport is not None:
        if isinstance(transport, FileDescriptor):
            transport.bufferSize = size
            break
        transport = getattr(transport, "transport", None)
    return protocol


@implementer(IStreamClientEndpoint)
class _LargeReads:
    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, factory: Any) -> Deferred[Any]:
        return self._endpoint.connect(factory).addCallback(set_read_size)


@implementer(IAgentEndpointFactory)
class UpstreamEndpoints:
    """Endpoints for ``Agent.usingEndpointFactory``: Twisted's usual ones
    (happy-eyeballs TCP, TLS with SNI and verification by ``policy``), with
    large socket reads."""

    def __init__(self, reactor: Any, policy: IPolicyForHTTPS, connect_timeout: float) -> None:
        self._reactor = reactor
        self._policy = policy
        self._timeout = connect_timeout

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._reactor, host, uri.port, timeout=self._timeout
        )
        if uri.scheme == b"https":
            creator = self._policy.creatorForNetloc(uri.host, uri.port)
            endpoint = _GatheringClientTLS(creator, endpoint)
        return _LargeReads(endpoint)
