"""Certificates by ACME: obtain one for ``acme_domains``, keep it under
``state_dir/acme``, renew it ``acme_renew_before`` seconds before it
expires and swap it into the listener without a restart.

The protocol is certbot's ``acme`` package. It blocks (``requests``), so
every ACME exchange, key generation and file write runs on a one-thread
pool owned by ``AcmeService``, never on the reactor. Validation is
TLS-ALPN-01 on the mirror's own listener (``alpn.py``), or HTTP-01 on a
plain listener (``http01.py``) when ``acme_challenge`` says so. A failure is logged
with the ACME server's reason and retried with a doubling delay; the
listener keeps serving what it has (the self-signed certificate at first).
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import josepy as jose
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mirrord import __version__
from mirrord.config import Config
from mirrord.daemon.alpn import ALPNResponder
from mirrord.daemon.http01 import HTTP01Responder
from mirrord.daemon.tls import ServerTLS, write_private

log = Logger()

# The longest wait between two failed attempts: daily, as certbot's timer.
MAX_BACKOFF = 24 * 3600.0
# Bounds on one attempt: each HTTP exchange, and validation plus issuance.
NETWORK_TIMEOUT = 30
ORDER_DEADLINE = datetime.timedelta(seconds=120)
# On stop, how long to wait for an attempt in progress before leaving its
# (daemon) thread behind.
STOP_WAIT = 5.0

if "tls-alpn-01" not in challenges.Challenge.TYPES:
    # acme 4 dropped its TLS-ALPN-01 classes (their pyOpenSSL certificate
    # helpers went away); the protocol side is the generic key-authorization
    # challenge, named here. The certificate is made in alpn.py.

    @challenges.ChallengeResponse.register
    class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
        """The (empty) answer that asks the server to validate."""

        typ = "tls-alpn-01"

    @challenges.Challenge.register
    class TLSALPN01(challenges.KeyAuthorizationChallenge):
        """RFC 8737's challenge: a certificate on port 443 proves control."""

        response_cls = TLSALPN01Response
        typ = response_cls.typ

        def validation(self, account_key: jose.JWK, **kwargs: Any) -> str:
            return self.key_authorization(account_key)


def acme_dir(config: Config) -> Path:
    return Path(config.state_dir) / "acme"


def held_certificate(config: Config) -> Path | None:
    """The certificate obtained earlier (key and full chain in one file,
    so a crash can never pair a new certificate with an old key)."""
    path = acme_dir(config) / "certificate.pem"
    return path if path.is_file() else None


def not_after(pem: bytes) -> float:
    """When the first certificate in ``pem`` expires, in epoch seconds."""
    start = pem.index(b"-----BEGIN CERTIFICATE-----")
    certificate = x509.load_pem_x509_certificate(pem[start:])
    return certificate.not_valid_after_utc.timestamp()


def reason(failure: Failure) -> str:
    """The ACME server's reason on one line (its problem documents carry
    the type and detail; a validation failure names each challenge's)."""
    text = str(failure.value) or failure.type.__name__
    return " ".join(text.split())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class Issuer:
    """One blocking attempt to obtain a certificate (runs in a thread)."""

    def __init__(
        self,
        config: Config,
        alpn: ALPNResponder | None = None,
        http: HTTP01Responder | None = None,
    ) -> None:
        self.config = config
        self.alpn = alpn
        self.http = http

    def _account_key(self) -> jose.JWKEC:
        path = acme_dir(self.config) / "account.key"
        if not path.is_file():
            write_private(path, _pem_key(ec.generate_private_key(ec.SECP256R1())))
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        return jose.JWKEC(key=key)

    def _client(self, key: jose.JWKEC) -> client.ClientV2:
        net = client.ClientNetwork(
            key,
            alg=jose.ES256,
            verify_ssl=self.config.acme_ca or True,
            user_agent=f"mirrord/{__version__}",
            timeout=NETWORK_TIMEOUT,
        )
        directory = client.ClientV2.get_directory(self.config.acme_directory, net)
        acme = client.ClientV2(directory, net)
        registration = messages.NewRegistration.from_data(
            email=self.config.acme_email or None, terms_of_service_agreed=True
        )
        try:
            acme.new_account(registration)
        except errors.ConflictError as e:
            # The key already has an account: use it.
            existing = messages.RegistrationResource(uri=e.location, body=messages.Registration())
            acme.query_registration(existing)
        return acme

    def issue(self) -> bytes:
        """Obtain a certificate; store and return its key and full chain."""
        acme_dir(self.config).mkdir(mode=0o700, parents=True, exist_ok=True)
        account_key = self._account_key()
        acme = self._client(account_key)
        key_pem = _pem_key(ec.generate_private_key(ec.SECP256R1()))
        order = acme.new_order(crypto_util.make_csr(key_pem, list(self.config.acme_domains)))
        kind = self.config.acme_challenge
        cleanups: list[Callable[[], None]] = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue
                domain = authz.body.identifier.value
                body = next((c for c in authz.body.challenges if c.chall.typ == kind), None)
                if body is None:
                    raise errors.Error(f"{domain}: the ACME server offers no {kind} challenge")
                cleanups.append(self._publish(domain, body.chall, account_key))
                acme.answer_challenge(body, body.chall.response(account_key))
            deadline = datetime.datetime.now() + ORDER_DEADLINE
            order = acme.poll_and_finalize(order, deadline)
        finally:
            for cleanup in cleanups:
                cleanup()
        pem = key_pem + order.fullchain_pem.encode("ascii")
        write_private(acme_dir(self.config) / "certificate.pem", pem)
        return pem

    def _publish(
        self, domain: str, chall: challenges.KeyAuthorizationChallenge, key: jose.JWK
    ) -> Callable[[], None]:
        """Answer the validation until the returned function is called."""
        key_authorization = chall.key_authorization(key)
        if chall.typ == "http-01" and self.http is not None:
            token = chall.encode("token")
            self.http.add(token, key_authorization)
            return lambda: self.http.remove(token)  # type: ignore[union-attr]
        if chall.typ == "tls-alpn-01" and self.alpn is not None:
            self.alpn.add(domain, key_authorization)
            return lambda: self.alpn.remove(domain)  # type: ignore[union-attr]
        raise errors.Error(f"no responder for {chall.typ}")


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    # A stuck ACME exchange must not keep the process from exiting.
    return threading.Thread(*args, daemon=True, **kwargs)


class AcmeService(Service):
    """Keeps a current certificate in ``server_tls``: checks at start,
    then sleeps until renewal is due or a failed attempt is retried."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        server_tls: ServerTLS,
        issue: Callable[[], bytes],
        load: Callable[[Path], SSL.Context],
        run: Callable[[Callable[[], Any]], Deferred[Any]] | None = None,
        renewed: Callable[[], object] = lambda: None,
    ) -> None:
        self.config = config
        # Told after a new certificate is in place: with workers, the
        # supervisor then has every other worker load it (SIGHUP).
        self.renewed = renewed
        self.reactor = reactor
        self.server_tls = server_tls
        self.issue = issue
        self.load = load
        self._pool: ThreadPool | None = None
        if run is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=1, name="acme")
            self._pool.threadFactory = _daemon_thread
            pool = self._pool

            def run(f: Callable[[], Any]) -> Deferred[Any]:
                return deferToThreadPool(reactor, pool, f)

        self._run = run
        held = held_certificate(config)
        self.expiry: float | None = not_after(held.read_bytes()) if held else None
        self.failures = 0
        self._timer: IDelayedCall | None = None
        self._attempt: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        if self._pool is not None:
            self._pool.start()
        self._check()

    def _schedule(self, delay: float) -> None:
        self._timer = self.reactor.callLater(max(0.0, delay), self._check)

    def _check(self) -> None:
        self._timer = None
        due = self.expiry is None or self.expiry - self.reactor.seconds() <= (
            self.config.acme_renew_before
        )
        if not due:
            assert self.expiry is not None
            self._schedule(self.expiry - self.config.acme_renew_before - self.reactor.seconds())
            return
        log.info(
            "ACME: requesting a certificate for {domains} from {directory}",
            domains=", ".join(self.config.acme_domains),
            directory=self.config.acme_directory,
        )

        def obtain() -> tuple[SSL.Context, float]:
            pem = self.issue()
            path = held_certificate(self.config)
            assert path is not None
            return self.load(path), not_after(pem)

        d = self._run(obtain)
        d.addCallbacks(self._obtained, self._failed)
        self._attempt = d

        def done(_: object) -> None:
            self._attempt = None

        d.addBoth(done)

    def _obtained(self, result: tuple[SSL.Context, float]) -> None:
        if not self.running:
            return
        context, expiry = result
        # New connections get the new certificate; open ones keep theirs.
        self.server_tls.context = context
        self.expiry = expiry
        self.failures = 0
        until = datetime.datetime.fromtimestamp(expiry, datetime.UTC)
        log.info(
            "ACME: serving a new certificate for {domains}, valid until {until}",
            domains=", ".join(self.config.acme_domains),
            until=until.isoformat(timespec="seconds"),
        )
        self.renewed()
        self._schedule(expiry - self.config.acme_renew_before - self.reactor.seconds())

    def _failed(self, failure: Failure) -> None:
        if not self.running:
            return
        self.failures += 1
        delay = min(self.config.acme_retry_after * 2 ** (self.failures - 1), MAX_BACKOFF)
        log.error(
            "ACME: no certificate for {domains}: {reason}; "
            "still serving the current one, retrying in {delay:.0f}s",
            domains=", ".join(self.config.acme_domains),
            reason=reason(failure),
            delay=delay,
        )
        self._schedule(delay)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        pool = self._pool
        if self._attempt is None:
            if pool is not None:
                pool.stop()
            return None
        # An attempt is in flight: give it a moment, then leave its thread.
        stopped: Deferred[None] = Deferred()
        timer = self.reactor.callLater(STOP_WAIT, lambda: stopped.called or stopped.callback(None))

        def finished(_: object) -> None:
            if timer.active():
                timer.cancel()
                if pool is not None:
                    pool.stop()
            if not stopped.called:
                stopped.callback(None)

        self._attempt.addBoth(finished)
        return stopped
