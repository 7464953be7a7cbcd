"""TLS: the server's (reloadable) context, a self-signed certificate for a
first start, and the policy for verifying upstreams.

The server context is built from PEM files as certbot writes them
(``fullchain.pem`` holds the certificate and its chain). ``ServerTLS``
hands out connections from whichever context was loaded last, so a reload
affects new connections only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from mirrord.config import Config

_MIN_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}


class CertificateError(Exception):
    """The certificate or key files cannot be used; the message says why."""


def make_context(cert: Path, key: Path, min_version: str, ciphers: str) -> SSL.Context:
    """A server context from PEM files, or ``CertificateError``."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(_MIN_VERSIONS[min_version])
    ctx.set_options(
        SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION
    )
    try:
        ctx.set_cipher_list(ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError) as e:
        raise CertificateError(f"tls_ciphers {ciphers!r} selects no usable cipher: {e}") from None
    # No ALPN callback: HTTP/1.1 is what a client gets when the server names
    # no protocol. (ACME's TLS-ALPN-01 adds callbacks, see alpn.py.)
    for path in (cert, key):
        if not path.is_file():
            raise CertificateError(f"{path}: no such file")
    try:
        ctx.use_certificate_chain_file(str(cert).encode())
    except SSL.Error as e:
        raise CertificateError(f"{cert}: not a PEM certificate chain ({e})") from None
    try:
        ctx.use_privatekey_file(str(key).encode())
        ctx.check_privatekey()
    except SSL.Error as e:
        raise CertificateError(f"{key}: not the private key of {cert} ({e})") from None
    return ctx


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Creates server TLS connections from the current context."""

    def __init__(
        self, context: SSL.Context, prepare: Callable[[SSL.Context], None] | None = None
    ) -> None:
        # ``prepare`` sees every context before it serves (ACME installs its
        # TLS-ALPN-01 callback there), whether loaded at start, on reload or
        # after a renewal.
        self._prepare = prepare
        self.context = context

    @property
    def context(self) -> SSL.Context:
        return self._context

    @context.setter
    def context(self, context: SSL.Context) -> None:
        if self._prepare is not None:
            self._prepare(context)
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.context, None)


def ensure_self_signed(state_dir: Path) -> tuple[Path, Path, bool]:
    """A self-signed certificate in ``state_dir/tls``, made on first use.

    Returns the certificate and key paths and whether they were just made.
    """
    directory = state_dir / "tls"
    cert, key = directory / "selfsigned.crt", directory / "selfsigned.key"
    if cert.is_file() and key.is_file():
        return cert, key, False
    directory.mkdir(parents=True, exist_ok=True)
    private = ec.generate_private_key(ec.SECP256R1())
    hostname = socket.gethostname()
    names: list[x509.GeneralName] = [
        x509.DNSName(hostname),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(private, hashes.SHA256())
    )
    write_private(
        key,
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    write_private(cert, certificate.public_bytes(serialization.Encoding.PEM))
    return cert, key, True


def write_private(path: Path, data: bytes) -> None:
    """Write whole-or-nothing, readable by the owner only."""
    temp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def fingerprint(cert: Path) -> str:
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    return loaded.fingerprint(hashes.SHA256()).hex(":").upper()


def upstream_policy(config: Config) -> IPolicyForHTTPS:
    """Verify upstreams against the system's CAs, or against ``upstream_ca``."""
    if not config.upstream_ca:
        return BrowserLikePolicyForHTTPS()
    try:
        pem = Path(config.upstream_ca).read_bytes()
    except OSError as e:
        raise CertificateError(f"{config.upstream_ca}: cannot read: {e.strerror}") from None
    try:
        roots = [
            ssl.Certificate.loadPEM(block + b"-----END CERTIFICATE-----\n")
            for block in pem.split(b"-----END CERTIFICATE-----")
            if b"-----BEGIN CERTIFICATE-----" in block
        ]
    except Exception as e:
        raise CertificateError(f"{config.upstream_ca}: not PEM certificates ({e})") from None
    if not roots:
        raise CertificateError(f"{config.upstream_ca}: holds no certificate")
    return BrowserLikePolicyForHTTPS(ssl.trustRootFromCertificates(roots))
