"""Throughput tweaks that reach below Twisted's public API, kept in one place.

Measured (``bench/``, ``../shared/PERF.md``): the cost of relaying a blob is
Python work per chunk. Twisted reads 64 KiB per ``recv`` and its TLS layer
cuts every write into 16 KiB ``SSL_write`` calls, each followed by a BIO read
and a transport write. Here upstream sockets read up to 2 MiB at a time and
the server's TLS layer encrypts 64 KiB per ``SSL_write`` and hands the
socket 1 MiB pieces of ciphertext, which about halves CPU per GiB.
Backpressure is unchanged: the transports still pause their producers when
their buffers fill. ``send_room`` tells a writer how much a client's socket
takes now, so a client that stops reading leaves its unread bytes in the
kernel rather than in our buffers.

``tests/test_tuning.py`` fails loudly if the internals used here
(``FileDescriptor.bufferSize``, ``SEND_LIMIT`` and its write buffer,
``TLSMemoryBIOProtocol._write`` and its helpers, pyOpenSSL's memory BIO
``Connection._from_ssl``) change underneath.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import socket
import struct
import sys
import termios
from typing import Any

from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from OpenSSL._util import no_zero_allocator as _no_zero_allocator
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
TLS_WRITE_SIZE = 64 << 10
# Plaintext whose ciphertext goes to the socket in one piece, and room for
# TLS records' overhead (at most a few hundred bytes per 16 KiB record)
# beyond it in the buffer that gathers them.
TLS_FLUSH_SIZE = 1 << 20
TLS_SLACK = 64 << 10
# One such piece per ``send``: split at 1 MiB, the few KiB of record
# overhead past it would wait in our memory (holding the whole piece) until
# the kernel calls the socket writable again, which a client that stopped
# reading never lets it do.
SEND_SIZE = TLS_FLUSH_SIZE + TLS_SLACK
# Upstream TLS: decrypted records (16 KiB at most) are gathered into pieces
# of up to this size before they reach the HTTP parser.
TLS_GATHER_SIZE = 1 << 20
# Linux's SIOCOUTQ: bytes in a TCP socket's send queue not yet acknowledged.
_OUTQ = termios.TIOCOUTQ if sys.platform.startswith("linux") else None
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


class _Ciphertext:
    """Takes TLS records out of a connection's memory BIO into one scratch
    buffer of our own, freed after each write.

    OpenSSL's memory BIO never gives back what it grew to: drained once per
    MiB it kept a MiB per connection for the connection's life, even for a
    client that had stopped reading. Drained every ``TLS_WRITE_SIZE``
    encrypted it stays near that size, while the socket still gets a piece
    of up to ``TLS_FLUSH_SIZE`` plaintext's ciphertext: one ``memcpy`` per
    byte, as ``bio_read`` did. (Draining after every 16 KiB record cost
    about 20 % more CPU per GiB in the TLS layer: a Python call per
    record.)"""

    def __init__(self, connection: Any, transport: Any, capacity: int) -> None:
        self._bio = connection._from_ssl
        self._transport = transport
        self._capacity = capacity
        self._buffer = _no_zero_allocator("char[]", capacity)
        self._filled = 0

    def gather(self) -> None:
        """Everything the BIO holds, into the buffer (sent when full)."""
        while True:
            room = self._capacity - self._filled
            if room == 0:
                self.send()
                room = self._capacity
            read = _lib.BIO_read(self._bio, self._buffer + self._filled, room)
            if read <= 0:
                return  # empty: a memory BIO has nothing else to say
            self._filled += read
            if read < room:
                return  # a memory BIO hands over all it has at once

    def send(self) -> None:
        if self._filled:
            data = _ffi.buffer(self._buffer, self._filled)[:]
            self._filled = 0
            self._transport.write(data)


class LargeWriteTLSProtocol(TLSMemoryBIOProtocol):
    """Server TLS with fewer, larger steps: 64 KiB per ``SSL_write``, the
    ciphertext handed to the socket once per MiB encrypted, and up to 1 MiB
    per ``send`` on the socket (Twisted sends 128 KiB per reactor iteration).
    Handing it over per MiB rather than per ``SSL_write`` gives the
    transport 16 times fewer pieces, which it would join (copy) before
    sending: measured with bench/run --rows, about 8-14 % less CPU per GiB
    on the proxy, cold and warm paths. The BIO itself is emptied every 64
    KiB (see ``_Ciphertext``), so a paused connection keeps no MiB-sized
    buffer."""

    def makeConnection(self, transport: Any) -> None:
        if isinstance(transport, FileDescriptor):
            transport.SEND_LIMIT = SEND_SIZE
        super().makeConnection(transport)

    def _write(self, bytes: bytes) -> None:
        if self._lostTLSConnection:
            return
        ciphertext = _Ciphertext(
            self._tlsConnection, self.transport, min(len(bytes), TLS_FLUSH_SIZE) + TLS_SLACK
        )
        sent_total = unflushed = ungathered = 0
        # Slices of a memoryview are not copies (pyOpenSSL takes any buffer).
        view = memoryview(bytes)
        while sent_total < len(bytes):
            try:
                # pyOpenSSL allows partial writes: one 16 KiB record a call.
                sent = self._tlsConnection.send(view[sent_total : sent_total + TLS_WRITE_SIZE])
            except WantReadError:
                self._bufferedWrite(bytes[sent_total:])
                break
            except Error:
                self._tlsShutdownFinished(Failure())
                break
            sent_total += sent
            unflushed += sent
            ungathered += sent
            if ungathered >= TLS_WRITE_SIZE:
                ciphertext.gather()
                ungathered = 0
            if unflushed >= TLS_FLUSH_SIZE:
                ciphertext.gather()
                ciphertext.send()
                unflushed = ungathered = 0
        ciphertext.gather()
        ciphertext.send()

    def _flushSendBIO(self) -> None:
        # Handshakes, alerts and shutdowns: small.
        ciphertext = _Ciphertext(self._tlsConnection, self.transport, TLS_SLACK)
        ciphertext.gather()
        ciphertext.send()


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


def _descriptor(transport: Any) -> FileDescriptor | None:
    """The socket's FileDescriptor under ``transport``, through any TLS layer."""
    while transport is not None and not isinstance(transport, FileDescriptor):
        transport = getattr(transport, "transport", None)
    return transport


def send_room(transport: Any) -> int | None:
    """Bytes the socket under ``transport`` would take now without anything
    waiting in our memory: its send buffer's size less what the kernel has
    queued and what Twisted still holds. ``None`` where that cannot be told
    (not a socket, not Linux).

    A writer that sizes its writes by this keeps a client's unread bytes in
    the kernel, which has them anyway, instead of in the daemon: a client
    that stops reading holds one small write, not a large one."""
    descriptor = _descriptor(transport)
    if descriptor is None or _OUTQ is None:
        return None
    try:
        sock = descriptor.getHandle()
        (queued,) = struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0"))
        size = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    except (AttributeError, OSError, ValueError):
        return None
    held = descriptor._tempDataLen + len(descriptor.dataBuffer) - descriptor.offset
    # The kernel reports twice the buffer it promises, keeping the rest for
    # its own overhead; counting on more left a few hundred KiB per stalled
    # client in our memory (tests/e2e/test_stalled.py), counting on half
    # leaves one small write.
    return max(0, size // 2 - queued - held)


def set_read_size(protocol: Any, size: int = READ_SIZE) -> Any:
    """Make the socket under ``protocol`` (through any TLS layer) read ``size``
    bytes per ``recv``."""
    descriptor = _descriptor(getattr(protocol, "transport", None))
    if descriptor is not None:
        descriptor.bufferSize = size
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
