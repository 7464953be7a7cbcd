"""TLS-ALPN-01 (RFC 8737): answer an ACME server's validation on the
mirror's own TLS listener, so no port 80 is needed.

While a domain is being validated, a connection whose ClientHello names
that domain (SNI) and offers only the protocol ``acme-tls/1`` gets a
self-signed certificate carrying the key authorization's digest, and the
protocol is confirmed. Everyone else keeps the server's usual certificate
and no protocol is named (HTTP/1.1), as without ACME.

In TLS 1.3 the server context's ALPN callback sees both the name and the
offered protocols and switches the connection to the validation context
(OpenSSL picks the certificate after ALPN there). In TLS 1.2 the
certificate is fixed before ALPN, so the SNI callback switches on the
name alone and the validation context's ALPN callback confirms
``acme-tls/1``. The callbacks cost cffi closures (writable+executable
memory), which the unit allows already for certificate verification; they
are installed only when ACME is configured.

With worker processes, ACME runs in worker 1 but the validator's
connection lands on any worker. Worker 1's responder also writes each
validation to ``<shared_dir>/acme-alpn/<domain>`` (from the ACME thread);
the other workers' responders read it there when a handshake names one of
``acme_domains`` and nothing is pending in memory. That read is a lookup of
a small file in a directory that is empty but for the seconds of a
validation (its dentries are cached: no disk wait), only for connections
naming the mirror's own ACME domains; the validation context made from it
is kept, so a validator's retries cost no new key.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier
from OpenSSL import SSL

ACME_TLS_1 = b"acme-tls/1"
# id-pe-acmeIdentifier, RFC 8737 section 6.1
ACME_IDENTIFIER = ObjectIdentifier("1.3.6.1.5.5.7.1.31")


def validation_certificate(
    domain: str, key_authorization: str
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The self-signed certificate RFC 8737 asks for: the domain as its only
    SAN and a critical acmeIdentifier holding SHA-256(key authorization)."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    # The extension's value is the DER of an OCTET STRING of the digest.
    der_octet_string = bytes([0x04, len(digest)]) + digest
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ACME challenge")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER, der_octet_string), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def _challenge_context(
    certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.use_certificate(certificate)
    ctx.use_privatekey(key)
    return ctx


class ALPNResponder:
    """The validations in progress, by domain. The ACME worker thread adds
    and removes them; the reactor thread reads them in the TLS callbacks,
    so a lock guards the table."""

    def __init__(self, shared: Path | None = None, domains: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, SSL.Context] = {}
        # Workers: the directory where validations are shared, the domains
        # worth looking for there, and contexts made from what was found.
        self._shared = shared
        self._domains = frozenset(d.lower() for d in domains)
        self._from_shared: dict[tuple[str, str], SSL.Context] = {}

    def add(self, domain: str, key_authorization: str) -> None:
        context = _validation_context(domain, key_authorization)
        with self._lock:
            self._pending[domain.lower()] = context
        if self._shared is not None:
            self._shared.mkdir(parents=True, exist_ok=True)
            path = self._shared / domain.lower()
            partial = path.with_name(path.name + ".new")
            partial.write_text(key_authorization)
            os.replace(partial, path)

    def remove(self, domain: str) -> None:
        with self._lock:
            self._pending.pop(domain.lower(), None)
        if self._shared is not None:
            (self._shared / domain.lower()).unlink(missing_ok=True)

    def pending(self) -> list[str]:
        with self._lock:
            return sorted(self._pending)

    def install(self, context: SSL.Context) -> None:
        """Answer validations on connections made from ``context``."""
        context.set_tlsext_servername_callback(self._servername)
        context.set_alpn_select_callback(self._select)

    def _validation(self, connection: SSL.Connection) -> SSL.Context | None:
        name = connection.get_servername()
        if not name:
            return None
        domain = name.decode("ascii", "replace").lower()
        with self._lock:
            context = self._pending.get(domain)
        if context is None and self._shared is not None and domain in self._domains:
            return self._shared_validation(domain)
        return context

    def _shared_validation(self, domain: str) -> SSL.Context | None:
        """Worker 1's validation of ``domain``, if one is in progress."""
        try:
            key_authorization = (self._shared / domain).read_text()  # type: ignore[operator]
        except OSError:
            return None
        context = self._from_shared.get((domain, key_authorization))
        if context is None:
            if len(self._from_shared) > 8:
                self._from_shared.clear()
            context = _validation_context(domain, key_authorization)
            self._from_shared[(domain, key_authorization)] = context
        return context

    def _servername(self, connection: SSL.Connection) -> None:
        # TLS 1.2 fixes the certificate before ALPN is handled, so the switch
        # must happen here, on the name alone: a TLS 1.2 client naming the
        # domain while it is validated (seconds) sees the validation
        # certificate. TLS 1.3 waits for the ALPN callback below.
        if connection.get_protocol_version() != SSL.TLS1_3_VERSION:
            context = self._validation(connection)
            if context is not None:
                connection.set_context(context)

    def _select(self, connection: SSL.Connection, offered: list[bytes]) -> bytes | object:
        if ACME_TLS_1 in offered:
            context = self._validation(connection)
            if context is not None:
                connection.set_context(context)
                return ACME_TLS_1
        # Name no protocol: HTTP/1.1, as when no callback is installed.
        return SSL.NO_OVERLAPPING_PROTOCOLS


def _validation_context(domain: str, key_authorization: str) -> SSL.Context:
    certificate, key = validation_certificate(domain, key_authorization)
    context = _challenge_context(certificate, key)
    context.set_alpn_select_callback(_confirm)
    return context


def _confirm(connection: SSL.Connection, offered: list[bytes]) -> bytes | object:
    """The validation context's answer (TLS 1.2)."""
    return ACME_TLS_1 if ACME_TLS_1 in offered else SSL.NO_OVERLAPPING_PROTOCOLS
