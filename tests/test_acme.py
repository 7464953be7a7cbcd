"""Certificates by ACME, in memory: the TLS-ALPN-01 responder against real
TLS handshakes, and the renewal service's timing with a ``task.Clock``
and an issuer the test answers."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from treq.testing import StubTreq
from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mirrord.config import Config
from mirrord.daemon.acme import MAX_BACKOFF, AcmeService
from mirrord.daemon.alpn import ACME_IDENTIFIER, ALPNResponder
from mirrord.daemon.http01 import HTTP01Responder
from mirrord.daemon.tls import ServerTLS, ensure_self_signed, make_context

DOMAIN = "mirror.example"
CIPHERS = Config().tls_ciphers


def handshake(
    server: SSL.Context, name: str, alpn: list[str] | None, version: ssl.TLSVersion
) -> tuple[x509.Certificate, str | None]:
    """A real TLS handshake in memory: what the client was shown and agreed."""
    connection = SSL.Connection(server, None)
    connection.set_accept_state()
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    client_context.maximum_version = version
    if alpn:
        client_context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(incoming, outgoing, server_hostname=name)
    for _ in range(20):
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        connection.bio_write(outgoing.read())
        try:
            connection.do_handshake()
        except SSL.WantReadError:
            pass
        try:
            incoming.write(connection.bio_read(65536))
        except SSL.WantReadError:
            pass
    der = client.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der), client.selected_alpn_protocol()


def acme_digest(certificate: x509.Certificate) -> bytes | None:
    try:
        extension = certificate.extensions.get_extension_for_oid(ACME_IDENTIFIER)
    except x509.ExtensionNotFound:
        return None
    assert extension.critical
    value = extension.value.value  # type: ignore[attr-defined]
    assert value[:2] == b"\x04\x20"  # DER OCTET STRING of 32 bytes
    return value[2:]


class ResponderTests(SynchronousTestCase):
    def setUp(self) -> None:
        cert, key, _ = ensure_self_signed(Path(tempfile.mkdtemp()))
        self.usual = x509.load_pem_x509_certificate(cert.read_bytes())
        self.responder = ALPNResponder()
        self.server = ServerTLS(make_context(cert, key, "1.2", CIPHERS), self.responder.install)
        self.responder.add(DOMAIN, "token.thumbprint")

    def test_validator_gets_validation_certificate(self) -> None:
        """A client offering only acme-tls/1 for a domain under validation gets the
        RFC 8737 certificate (critical digest of the key authorization) and the protocol."""
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            with self.subTest(version=version):
                shown, agreed = handshake(self.server.context, DOMAIN, ["acme-tls/1"], version)
                self.assertEqual(agreed, "acme-tls/1")
                self.assertEqual(acme_digest(shown), hashlib.sha256(b"token.thumbprint").digest())
                names = shown.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                self.assertEqual(names.value.get_values_for_type(x509.DNSName), [DOMAIN])

    def test_ordinary_clients_keep_the_usual_certificate(self) -> None:
        """Browsers and docker (h2/http1.1 or no ALPN, TLS 1.3) get the usual certificate
        and no protocol, even naming the domain mid-validation; other names always do."""
        cases = [
            (DOMAIN, ["h2", "http/1.1"], ssl.TLSVersion.TLSv1_3),
            (DOMAIN, None, ssl.TLSVersion.TLSv1_3),
            ("other.example", ["acme-tls/1"], ssl.TLSVersion.TLSv1_3),
            ("other.example", ["acme-tls/1"], ssl.TLSVersion.TLSv1_2),
            ("other.example", None, ssl.TLSVersion.TLSv1_2),
        ]
        for name, alpn, version in cases:
            with self.subTest(name=name, alpn=alpn, version=version):
                shown, agreed = handshake(self.server.context, name, alpn, version)
                self.assertEqual(shown, self.usual)
                self.assertIsNone(agreed)

    def test_removed_validation_is_no_longer_answered(self) -> None:
        """Once the validation is over, acme-tls/1 clients get the usual certificate."""
        self.responder.remove(DOMAIN)
        shown, agreed = handshake(
            self.server.context, DOMAIN, ["acme-tls/1"], ssl.TLSVersion.TLSv1_3
        )
        self.assertEqual(shown, self.usual)
        self.assertIsNone(agreed)

    def test_swapped_context_answers_too(self) -> None:
        """A context swapped in later (renewal, SIGHUP) also answers validations."""
        cert, key, _ = ensure_self_signed(Path(tempfile.mkdtemp()))
        self.server.context = make_context(cert, key, "1.2", CIPHERS)
        _, agreed = handshake(self.server.context, DOMAIN, ["acme-tls/1"], ssl.TLSVersion.TLSv1_3)
        self.assertEqual(agreed, "acme-tls/1")


class SharedResponderTests(SynchronousTestCase):
    def test_any_worker_answers_worker_ones_validation(self) -> None:
        """With workers, a validation added in worker 1 is answered by another worker's
        listener too (TLS 1.2 and 1.3), and no longer once it is removed."""
        shared = Path(tempfile.mkdtemp()) / "acme-alpn"
        cert, key, _ = ensure_self_signed(Path(tempfile.mkdtemp()))
        usual = x509.load_pem_x509_certificate(cert.read_bytes())
        first = ALPNResponder(shared, [DOMAIN])
        other = ALPNResponder(shared, [DOMAIN])
        server = ServerTLS(make_context(cert, key, "1.2", CIPHERS), other.install)
        first.add(DOMAIN, "token.thumbprint")
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            with self.subTest(version=version):
                shown, agreed = handshake(server.context, DOMAIN, ["acme-tls/1"], version)
                self.assertEqual(agreed, "acme-tls/1")
                self.assertEqual(acme_digest(shown), hashlib.sha256(b"token.thumbprint").digest())
        first.remove(DOMAIN)
        shown, agreed = handshake(server.context, DOMAIN, ["acme-tls/1"], ssl.TLSVersion.TLSv1_3)
        self.assertEqual((shown, agreed), (usual, None))


class HTTP01Tests(SynchronousTestCase):
    def setUp(self) -> None:
        self.responder = HTTP01Responder()
        self.client = StubTreq(self.responder)

    def get(self, path: str) -> tuple[int, bytes]:
        response = self.successResultOf(self.client.get(f"http://m.example{path}"))
        return response.code, self.successResultOf(response.content())

    def test_token_answered_while_validated(self) -> None:
        """The key authorization is served at its token's path until removed, then 404."""
        self.responder.add("tok3n", "tok3n.thumb")
        self.assertEqual(self.get("/.well-known/acme-challenge/tok3n"), (200, b"tok3n.thumb"))
        self.responder.remove("tok3n")
        self.assertEqual(self.get("/.well-known/acme-challenge/tok3n")[0], 404)

    def test_nothing_else_served(self) -> None:
        """Other tokens, other paths and the registry API get 404 on the plain port."""
        self.responder.add("tok3n", "tok3n.thumb")
        for path in ("/.well-known/acme-challenge/other", "/v2/", "/", "/tok3n"):
            with self.subTest(path=path):
                self.assertEqual(self.get(path)[0], 404)


def issued(directory: Path, days: float, now: float) -> bytes:
    """A key and certificate in one PEM, as the issuer stores them."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DOMAIN)])
    start = datetime.datetime.fromtimestamp(now, datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - datetime.timedelta(minutes=5))
        .not_valid_after(start + datetime.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ) + certificate.public_bytes(serialization.Encoding.PEM)
    (directory / "acme").mkdir(exist_ok=True)
    (directory / "acme" / "certificate.pem").write_bytes(pem)
    return pem


class ServiceTests(SynchronousTestCase):
    """The service asks ``issue`` when a certificate is due; the test decides
    what each attempt returns."""

    def setUp(self) -> None:
        self.state = Path(tempfile.mkdtemp())
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        cert, key, _ = ensure_self_signed(self.state)
        self.selfsigned = make_context(cert, key, "1.2", CIPHERS)
        self.server = ServerTLS(self.selfsigned)
        self.config = Config(
            state_dir=str(self.state), acme_domains=(DOMAIN,), acme_retry_after=60.0
        )
        self.outcomes: list[Callable[[], bytes]] = []
        self.attempts = 0
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def issue(self) -> bytes:
        self.attempts += 1
        return self.outcomes.pop(0)()

    def service(self, config: Config | None = None) -> AcmeService:
        def run(f: Callable[[], Any]) -> Deferred[Any]:
            try:
                return succeed(f())
            except Exception as e:
                return fail(e)

        service = AcmeService(
            config or self.config,
            self.clock,
            self.server,
            self.issue,
            lambda path: make_context(path, path, "1.2", CIPHERS),
            run,
        )
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def served_serial(self) -> int:
        shown, _ = handshake(self.server.context, DOMAIN, None, ssl.TLSVersion.TLSv1_3)
        return shown.serial_number

    def test_first_certificate_swapped_in(self) -> None:
        """With no certificate held, one is requested at start and served at once."""
        pems: list[bytes] = []
        self.outcomes.append(
            lambda: pems.append(issued(self.state, 90, self.clock.seconds())) or pems[0]
        )
        self.service()
        self.assertEqual(self.attempts, 1)
        expected = x509.load_pem_x509_certificate(pems[0][pems[0].index(b"-----BEGIN CERT") :])
        self.assertEqual(self.served_serial(), expected.serial_number)

    def test_renews_when_due_and_not_before(self) -> None:
        """A held certificate is renewed renew_before its expiry, not earlier, and so is
        the renewed one."""
        issued(self.state, 40, self.clock.seconds())
        config = dataclasses.replace(self.config, acme_renew_before=30 * 86400.0)
        self.outcomes.extend([lambda: issued(self.state, 90, self.clock.seconds())] * 2)
        self.service(config)
        self.assertEqual(self.attempts, 0)
        self.clock.advance(10 * 86400 - 60)
        self.assertEqual(self.attempts, 0)
        self.clock.advance(120)
        self.assertEqual(self.attempts, 1)
        self.assertIsNot(self.server.context, self.selfsigned)
        # The renewed one (90 days) is renewed in its turn, 60 days on.
        self.clock.advance(60 * 86400 - 60)
        self.assertEqual(self.attempts, 1)
        self.clock.advance(120)
        self.assertEqual(self.attempts, 2)

    def test_failures_logged_with_reason_and_retried_with_backoff(self) -> None:
        """A failed attempt logs the server's reason, keeps the current certificate,
        and is retried after 60, 120, 240 s ... never more than a day apart."""

        def refused() -> bytes:
            raise RuntimeError("urn:ietf:params:acme:error:unauthorized :: no answer on 443")

        self.outcomes.extend([refused] * 14)
        self.service()
        self.assertEqual(self.attempts, 1)
        self.assertIs(self.server.context, self.selfsigned)
        errors = [e for e in self.events if e.get("log_level").name == "error"]
        self.assertIn("no answer on 443", errors[-1]["reason"])
        for expected_delay in (60, 120, 240, 480):
            self.clock.advance(expected_delay - 1)
            before = self.attempts
            self.clock.advance(1)
            self.assertEqual(self.attempts, before + 1, expected_delay)
        for _ in range(9):
            self.clock.advance(MAX_BACKOFF)
        self.assertEqual(self.attempts, 14)
        self.assertEqual(self.events[-1]["delay"], MAX_BACKOFF)
        self.assertIs(self.server.context, self.selfsigned)

    def test_stop_cancels_the_next_attempt(self) -> None:
        """After stopping, no attempt is made."""
        issued(self.state, 90, self.clock.seconds())
        service = self.service()
        service.stopService()
        self.clock.advance(100 * 86400)
        self.assertEqual(self.attempts, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
