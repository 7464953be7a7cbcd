"""Certificates by ACME, end to end: mirrord against Pebble (Let's Encrypt's
test server) on loopback, validated by TLS-ALPN-01 on mirrord's own port.

pebble-challtestsrv is Pebble's DNS: every name resolves to 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import stat
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.support.pki import Pki
from tests.support.processes import DEAD_PORT, Process, free_port, mirrord_argv

if not shutil.which("pebble") or not shutil.which("pebble-challtestsrv"):
    pytest.skip("ACME tests need Debian's pebble", allow_module_level=True)

DOMAIN = "mirror.example"
# Loopback only, whatever the environment says about proxies.
NO_PROXY = {"NO_PROXY": "*", "no_proxy": "*", "HTTPS_PROXY": "", "https_proxy": ""}


@dataclass
class Pebble:
    directory: str
    management: int
    processes: list[Process]

    def root(self, pki: Pki) -> bytes:
        """Pebble's root, made afresh at each start (its management API)."""
        context = ssl.create_default_context(cafile=str(pki.ca))
        url = f"https://127.0.0.1:{self.management}/roots/0"
        with urllib.request.urlopen(url, context=context, timeout=10) as answer:
            return answer.read()

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


def start_pebble(
    workdir: Path,
    pki: Pki,
    name: str,
    tls_port: int,
    validity: int | None = None,
    http_port: int = DEAD_PORT,
) -> Pebble:
    """Pebble validating TLS-ALPN-01 on ``tls_port`` (HTTP-01 on ``http_port``)."""
    dns, dns_management = free_port(), free_port()
    port, management = free_port(), free_port()
    settings: dict[str, object] = {
        "listenAddress": f"127.0.0.1:{port}",
        "managementListenAddress": f"127.0.0.1:{management}",
        "certificate": str(pki.fullchain),
        "privateKey": str(pki.privkey),
        "httpPort": http_port,
        "tlsPort": tls_port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
    }
    if validity is not None:
        settings["certificateValidityPeriod"] = validity
    config = workdir / f"pebble-{name}.json"
    config.write_text(json.dumps({"pebble": settings}))
    challtestsrv = Process(
        f"challtestsrv-{name}",
        [
            "pebble-challtestsrv",
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
            "-dns01",
            f"127.0.0.1:{dns}",
            "-management",
            f"127.0.0.1:{dns_management}",
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
        ],
        dns_management,
        workdir / f"challtestsrv-{name}.log",
    ).start()
    pebble = Process(
        f"pebble-{name}",
        ["pebble", "-config", str(config), "-dnsserver", f"127.0.0.1:{dns}"],
        port,
        workdir / f"pebble-{name}.log",
        env={
            "PEBBLE_VA_NOSLEEP": "1",
            "PEBBLE_VA_ALWAYS_VALID": "0",
            "PEBBLE_WFE_NONCEREJECT": "0",
            "PEBBLE_AUTHZREUSE": "0",
        },
    )
    try:
        pebble.start()
    except Exception:
        challtestsrv.stop()
        raise
    return Pebble(f"https://127.0.0.1:{port}/dir", management, [pebble, challtestsrv])


def start_acme_mirror(
    workdir: Path,
    pki: Pki,
    name: str,
    port: int,
    pebble: Pebble,
    extra: str = "",
    workers: str = "1",
) -> tuple[Process, Path]:
    state = workdir / f"state-acme-{name}"
    config = workdir / f"acme-{name}.toml"
    config.write_text(
        f'acme_domains = ["{DOMAIN}"]\n'
        f'acme_email = "admin@{DOMAIN}"\n'
        f'acme_directory = "{pebble.directory}"\n'
        f'acme_ca = "{pki.ca}"\n'
        "acme_retry_after = 1\n" + extra
    )
    mirror = Process(
        f"acme-{name}",
        mirrord_argv(
            "--config",
            str(config),
            "--listen",
            str(port),
            "--state-dir",
            str(state),
            "--upstream",
            f"http://127.0.0.1:{DEAD_PORT}",
            "--workers",
            workers,
        ),
        port,
        workdir / f"mirror-acme-{name}.log",
        env=NO_PROXY,
    ).start()
    return mirror, state


def served_certificate(port: int) -> x509.Certificate:
    """The certificate a client naming the domain is shown."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=DOMAIN) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def issuer(certificate: x509.Certificate) -> str:
    return certificate.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def wait_for(condition: Callable[[], object], timeout: float, what: str, mirror: Process) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{mirror.output()}")


def get_healthz(tls: ssl.SSLSocket) -> bytes:
    tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while b"ok\n" not in answer:
        chunk = tls.recv(4096)
        if not chunk:
            break
        answer += chunk
    return answer


def test_first_issuance_replaces_self_signed(workdir: Path, pki: Pki) -> None:
    """mirrord starts on its self-signed certificate, obtains one from Pebble by
    TLS-ALPN-01 and serves it to clients that trust Pebble's root, without a restart."""
    port = free_port()
    pebble = start_pebble(workdir, pki, "first", port)
    try:
        mirror, state = start_acme_mirror(workdir, pki, "first", port, pebble)
        try:
            wait_for(
                lambda: issuer(served_certificate(port)).startswith("Pebble"),
                60,
                "a certificate from Pebble",
                mirror,
            )
            root = workdir / "pebble-first-root.pem"
            root.write_bytes(pebble.root(pki))
            client = ssl.create_default_context(cafile=str(root))
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with client.wrap_socket(raw, server_hostname=DOMAIN) as tls:
                    assert get_healthz(tls).startswith(b"HTTP/1.1 200 ")
            assert "self-signed" in mirror.output()
            assert f"serving a new certificate for {DOMAIN}" in mirror.output()
            for path in (state / "acme" / "certificate.pem", state / "acme" / "account.key"):
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        finally:
            mirror.stop()
        # A restart serves the stored certificate from the first connection.
        mirror, _ = start_acme_mirror(workdir, pki, "first", port, pebble)
        try:
            assert issuer(served_certificate(port)).startswith("Pebble")
        finally:
            mirror.stop()
    finally:
        pebble.stop()


def test_renewal_swaps_certificate_while_connections_continue(workdir: Path, pki: Pki) -> None:
    """A certificate near its end is renewed and served to new connections, while
    a connection opened before the renewal keeps working."""
    port = free_port()
    pebble = start_pebble(workdir, pki, "renew", port, validity=60)
    try:
        # Renewal falls due 10 s after each issuance.
        mirror, _ = start_acme_mirror(
            workdir, pki, "renew", port, pebble, "acme_renew_before = 50\n"
        )
        try:
            wait_for(
                lambda: issuer(served_certificate(port)).startswith("Pebble"),
                60,
                "a first certificate",
                mirror,
            )
            first = served_certificate(port).serial_number
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname=DOMAIN) as tls:
                    assert get_healthz(tls).startswith(b"HTTP/1.1 200 ")
                    wait_for(
                        lambda: served_certificate(port).serial_number != first,
                        60,
                        "a renewed certificate",
                        mirror,
                    )
                    assert get_healthz(tls).startswith(b"HTTP/1.1 200 ")
            assert issuer(served_certificate(port)).startswith("Pebble")
        finally:
            mirror.stop()
    finally:
        pebble.stop()


def test_failed_challenge_logged_retried_and_self_signed_kept(workdir: Path, pki: Pki) -> None:
    """When Pebble cannot reach the challenge, mirrord logs Pebble's reason, keeps
    serving its self-signed certificate, and tries again later."""
    port = free_port()
    pebble = start_pebble(workdir, pki, "fail", DEAD_PORT)
    try:
        mirror, state = start_acme_mirror(workdir, pki, "fail", port, pebble)
        try:
            wait_for(
                lambda: mirror.output().count(f"ACME: no certificate for {DOMAIN}") >= 2,
                60,
                "two failed attempts",
                mirror,
            )
            log = mirror.output()
            # Pebble's problem document, as Pebble words it.
            assert "urn:ietf:params:acme:error:unauthorized" in log, log
            assert f"Failed to connect to 127.0.0.1:{DEAD_PORT} for the tls-alpn-01" in log, log
            assert "retrying in 1s" in log and "retrying in 2s" in log, log
            selfsigned = x509.load_pem_x509_certificate(
                (state / "tls" / "selfsigned.crt").read_bytes()
            )
            assert served_certificate(port) == selfsigned
            assert not (state / "acme" / "certificate.pem").exists()
        finally:
            mirror.stop()
    finally:
        pebble.stop()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_http01_on_a_plain_listener(workdir: Path, pki: Pki, workers: str) -> None:
    """With acme_challenge = "http-01" Pebble validates on mirrord's plain HTTP
    listener, which serves nothing else, and the certificate is served on TLS
    (with 2 workers: the port-80 socket is worker 1's, where ACME runs)."""
    port, http_port = free_port(), free_port()
    name = f"http01-{workers}"
    pebble = start_pebble(workdir, pki, name, DEAD_PORT, http_port=http_port)
    try:
        mirror, _ = start_acme_mirror(
            workdir,
            pki,
            name,
            port,
            pebble,
            'acme_challenge = "http-01"\n'
            f'acme_http_listen = "tcp:{http_port}:interface=127.0.0.1"\n',
            workers,
        )
        try:
            wait_for(
                lambda: issuer(served_certificate(port)).startswith("Pebble"),
                60,
                "a certificate from Pebble",
                mirror,
            )
            with socket.create_connection(("127.0.0.1", http_port), timeout=10) as plain:
                plain.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = plain.recv(4096)
            assert answer.startswith(b"HTTP/1.1 404 "), answer
        finally:
            mirror.stop()
    finally:
        pebble.stop()
