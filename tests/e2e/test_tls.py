"""The TLS listener as a client meets it: certificate chains, the
self-signed first start, protocol versions, IPv4 and IPv6."""

from __future__ import annotations

import socket
import ssl
import stat
from pathlib import Path

import pytest

from tests.e2e.conftest import Mirror, start_mirror
from tests.support.pki import Pki
from tests.support.processes import DEAD_PORT, Process, free_port, mirrord_argv


def _handshake(host: str, port: int, context: ssl.SSLContext) -> tuple[str, bytes]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as raw:
        raw.settimeout(10)
        raw.connect((host, port))
        with context.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := tls.recv(4096):
                answer += chunk
            return tls.version() or "", answer


def test_fullchain_serves_intermediate(registry_mirror: Mirror, pki: Pki) -> None:
    """With certbot's fullchain.pem a client trusting only the root verifies the server."""
    version, answer = _handshake(
        "127.0.0.1", registry_mirror.port, registry_mirror.tls_context(pki)
    )
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"ok\n")
    assert version in ("TLSv1.2", "TLSv1.3")


def test_tls_12_accepted_by_default_and_min_version_configurable(workdir: Path, pki: Pki) -> None:
    """A TLS 1.2-only client is served by default and refused when tls_min_version is 1.3."""
    client = ssl.create_default_context(cafile=str(pki.ca))
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    config = workdir / "tls13.toml"
    config.write_text('tls_min_version = "1.3"\n')
    default = start_mirror(workdir, pki, [f"http://127.0.0.1:{DEAD_PORT}"], "tls12")
    strict = start_mirror(
        workdir, pki, [f"http://127.0.0.1:{DEAD_PORT}"], "tls13", "--config", str(config)
    )
    try:
        assert _handshake("127.0.0.1", default.port, client)[0] == "TLSv1.2"
        with pytest.raises(ssl.SSLError):
            _handshake("127.0.0.1", strict.port, client)
        modern = ssl.create_default_context(cafile=str(pki.ca))
        assert _handshake("127.0.0.1", strict.port, modern)[0] == "TLSv1.3"
    finally:
        default.stop()
        strict.stop()


def test_first_start_makes_self_signed_certificate(workdir: Path) -> None:
    """Without a certificate one is made and announced; a bare port serves IPv4 and IPv6."""
    port = free_port()
    state = workdir / "state-selfsigned"
    (workdir / "empty.toml").write_text("")
    mirror = Process(
        "selfsigned",
        mirrord_argv(
            "--config",
            str(workdir / "empty.toml"),
            "--listen",
            str(port),
            "--state-dir",
            str(state),
            "--upstream",
            f"http://127.0.0.1:{DEAD_PORT}",
        ),
        port,
        workdir / "mirror-selfsigned.log",
    ).start()
    try:
        cert = state / "tls" / "selfsigned.crt"
        key = state / "tls" / "selfsigned.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert f"serving the self-signed certificate {cert}" in mirror.output()
        context = ssl.create_default_context(cafile=str(cert))
        for host in ("127.0.0.1", "::1"):
            _, answer = _handshake(host, port, context)
            assert answer.startswith(b"HTTP/1.1 200 "), host
        context.check_hostname = False
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw) as tls:
                tls.sendall(
                    b"GET / HTTP/1.1\r\nHost: mirror.example.com\r\nAccept-Language: en\r\n"
                    b"Connection: close\r\n\r\n"
                )
                page = b""
                while chunk := tls.recv(65536):
                    page += chunk
        assert b"self-signed certificate" in page
        assert str(cert).encode() in page
    finally:
        mirror.stop()
