"""Running as Debian admins do: the install script into a throwaway root,
the unit checked by systemd-analyze, and the daemon started with the unit's
own command line: sd_notify, SIGHUP certificate reload during a transfer,
a broken certificate on reload, SIGTERM draining a transfer."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import stat
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Mirror, start_mirror
from tests.support.pki import Pki, make_pki
from tests.support.processes import REPO, Process, free_port, run, twistd

UNIT = REPO / "systemd" / "mirrord.service"


def _unit_value(key: str) -> str:
    match = re.search(rf"^{key}=(.*)$", UNIT.read_text(), re.MULTILINE)
    assert match, key
    return match.group(1)


def _install(root: Path) -> None:
    wheels = REPO / ".wheels"  # made by tests/run, outside the network namespace
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)} if wheels.is_dir() else {}
    run(["bash", str(REPO / "systemd" / "install"), "--root", str(root)], timeout=300, env=env)


def _logged(daemon: Process, text: str, timeout: float = 10.0) -> None:
    """Wait for ``text`` in the daemon's output: log lines are written once
    per reactor turn, so they may follow a notification sent in the same one."""
    deadline = time.monotonic() + timeout
    while text not in daemon.output():
        assert time.monotonic() < deadline, f"not logged: {text!r}"
        time.sleep(0.05)


def test_install_into_throwaway_root(tmp_path: Path) -> None:
    """The installer lays down venv, unit, config, ufw profile; a rerun keeps an edited config."""
    root = tmp_path / "root"
    _install(root)
    unit = root / "etc/systemd/system/mirrord.service"
    config = root / "etc/mirrord/mirrord.toml"
    profile = root / "etc/ufw/applications.d/mirrord"
    expected = {
        unit: 0o644,
        config: 0o640,
        root / "etc/mirrord": 0o750,
        profile: 0o644,
        root / "opt/mirrord/share/README.md": 0o644,
    }
    for path, mode in expected.items():
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
        if os.geteuid() == 0:
            assert path.stat().st_uid == 0, path
    assert unit.read_text() == UNIT.read_text()
    assert "ports=443/tcp" in profile.read_text()
    assert "mirrord" in run([str(root / "opt/mirrord/bin/twistd"), "--help"]).stdout

    config.write_text("listen = [8443, 9443]\n")
    _install(root)
    assert config.read_text() == "listen = [8443, 9443]\n"
    assert (root / "etc/mirrord/mirrord.toml.example").exists()
    assert "ports=8443/tcp|9443/tcp" in profile.read_text()


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze")
def test_unit_verifies_and_scores_ok(tmp_path: Path) -> None:
    """systemd-analyze verify passes and the security exposure is 2.0 or lower."""
    copy = tmp_path / "mirrord.service"
    copy.write_text(UNIT.read_text().replace("/opt/mirrord/bin/twistd", twistd()))
    run(["systemd-analyze", "verify", str(copy)])
    report = run(["systemd-analyze", "security", "--offline=true", str(copy)], check=False)
    score = re.search(r"Overall exposure level for mirrord.service: ([0-9.]+)", report.stdout)
    assert score, report.stdout[-500:]
    assert float(score.group(1)) <= 2.0


class Notifications:
    """A $NOTIFY_SOCKET that collects what the daemon tells systemd."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(15)

    def expect(self, state: str) -> None:
        deadline = time.monotonic() + 15
        seen = []
        while time.monotonic() < deadline:
            message = self.sock.recv(4096).decode()
            seen.append(message)
            if state in message.split("\n"):
                return
        raise AssertionError(f"never got {state}; got {seen}")


def _serving_certificate(port: int, ca: Path) -> None:
    """A fresh TLS connection verifies against ``ca`` (or raises)."""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1"):
            pass


class SlowDownload:
    """A download of the big blob, read a little at a time by the test."""

    def __init__(self, port: int, pki: Pki, digest: str, token: str) -> None:
        context = ssl.create_default_context(cafile=str(pki.ca))
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.tls.sendall(
            f"GET /v2/library/alpine/blobs/{digest} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.tls.recv(65536)
        head, _, body = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        self.length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
        self.hash = hashlib.sha256(body)
        self.received = len(body)

    def read(self, amount: int | None = None) -> None:
        target = self.length if amount is None else min(self.length, self.received + amount)
        deadline = time.monotonic() + 120
        while self.received < target and time.monotonic() < deadline:
            data = self.tls.recv(1 << 20)
            if not data:
                break
            self.hash.update(data)
            self.received += len(data)

    def digest(self) -> str:
        self.tls.close()
        return "sha256:" + self.hash.hexdigest()


def _manifest_status(port: int, ca: Path, token: str) -> int:
    """GET library/alpine:latest through the mirror; the status."""
    import http.client

    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        conn.request(
            "GET",
            "/v2/library/alpine/manifests/latest",
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/vnd.oci.image.manifest.v1+json",
            },
        )
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_unit_command_line_reload_and_graceful_stop(workdir: Path, pki: Pki, hubs) -> None:
    """The unit's command line runs; SIGHUP swaps the certificate and the upstream chain
    under a running download; a broken certificate is refused; SIGTERM lets a transfer
    finish and exits 0."""
    from tests.e2e.test_hub import _get_token

    hub, second = hubs
    tls_dir = workdir / "reload-tls"
    tls_dir.mkdir()
    cert, key = tls_dir / "fullchain.pem", tls_dir / "privkey.pem"
    shutil.copy(pki.fullchain, cert)
    shutil.copy(pki.privkey, key)
    port = free_port()
    config = workdir / "unit.toml"
    settings = (
        f'listen = ["tcp:{port}:interface=127.0.0.1"]\ncert = "{cert}"\nkey = "{key}"\n'
        f'state_dir = "{workdir / "state-unit"}"\ngrace_period = 60\nworkers = 1\n'
        '[registries."docker.io"]\nupstreams = ["{upstream}"]\n'
    )
    config.write_text(settings.replace("{upstream}", hub.url))
    argv = shlex.split(_unit_value("ExecStart"))
    assert argv[0] == "/opt/mirrord/bin/twistd" and argv[-1] == "/etc/mirrord/mirrord.toml"
    argv = [twistd(), *argv[1:-1], str(config)]
    notifications = Notifications(workdir / "notify.sock")
    daemon = Process(
        "unit", argv, port, workdir / "unit.log", env={"NOTIFY_SOCKET": str(notifications.path)}
    ).start()
    try:
        notifications.expect("READY=1")
        token = _get_token(
            Mirror("unit", [], port, daemon.log), pki, "repository:library/alpine:pull"
        )
        download = SlowDownload(port, pki, hub.big_digest, token)
        download.read(8 << 20)

        other = make_pki(workdir / "pki-renewed", "renewed")
        shutil.copy(other.fullchain, cert)
        shutil.copy(other.privkey, key)
        config.write_text(settings.replace("{upstream}", second.url))
        hub_before = hub.control()["counts"].get("GET manifests", 0)
        second_before = second.control()["counts"].get("GET manifests", 0)
        os.kill(daemon.pid, signal.SIGHUP)
        notifications.expect("RELOADING=1")
        notifications.expect("READY=1")
        _serving_certificate(port, other.ca)
        with pytest.raises(ssl.SSLError):
            _serving_certificate(port, pki.ca)
        # The next pull asks the new chain, not the old one.
        assert _manifest_status(port, other.ca, token) == 200
        assert second.control()["counts"].get("GET manifests", 0) == second_before + 1
        assert hub.control()["counts"].get("GET manifests", 0) == hub_before

        cert.write_text("not a certificate\n")
        os.kill(daemon.pid, signal.SIGHUP)
        notifications.expect("READY=1")
        _serving_certificate(port, other.ca)
        _logged(daemon, "reload failed, still running the previous setup")
        assert str(cert) in daemon.output()

        download.read()
        assert download.received == hub.big_size
        assert download.digest() == hub.big_digest

        shutil.copy(other.fullchain, cert)
        draining = SlowDownload(port, other, hub.big_digest, token)
        draining.read(8 << 20)
        os.kill(daemon.pid, signal.SIGTERM)
        notifications.expect("STOPPING=1")
        draining.read()
        assert draining.digest() == hub.big_digest
        assert daemon.proc.wait(30) == 0
    finally:
        daemon.stop()


def test_combined_access_log_reopens_on_sigusr1(workdir: Path, pki: Pki) -> None:
    """access_log writes nginx's combined format; after logrotate's rename, SIGUSR1 reopens it."""
    from tests.e2e.test_pull import _raw_tls

    log = workdir / "logs" / "access.log"
    config = workdir / "accesslog.toml"
    config.write_text(f'access_log = "{log}"\n')
    mirror = start_mirror(
        workdir, pki, ["http://127.0.0.1:9"], "accesslog", "--config", str(config)
    )
    request = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: probe/1\r\nConnection: close\r\n\r\n"
    )
    try:
        _raw_tls(mirror, pki, request)
        line = log.read_text().strip()
        assert re.fullmatch(
            r"127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "
            r'"GET /healthz HTTP/1\.1" 200 3 "-" "probe/1"',
            line,
        ), line
        log.rename(log.with_suffix(".log.1"))
        os.kill(mirror.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not log.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        _raw_tls(mirror, pki, request)
        assert '"GET /healthz HTTP/1.1" 200' in log.read_text()
        assert log.with_suffix(".log.1").read_text().count("\n") == 1
    finally:
        mirror.stop()


MDWE_PROBE = """
import ctypes, sys
if sys.argv[1] == "yes":
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        sys.exit(3)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
options = optionsForClientTLS("registry-1.docker.io")  # verifying, with callbacks
factory = TLSMemoryBIOFactory(options, True, Factory.forProtocol(Protocol))
transport = StringTransport()
factory.buildProtocol(None).makeConnection(transport)
assert transport.value(), "no ClientHello"
"""


def test_unit_memory_policy_allows_upstream_tls() -> None:
    """Whatever the unit says about MemoryDenyWriteExecute, verifying an upstream's
    certificate still works under it (cffi callbacks need W+X memory)."""
    denied = re.search(r"^MemoryDenyWriteExecute=(yes|true|1)$", UNIT.read_text(), re.MULTILINE)
    result = run(
        [sys.executable, "-c", MDWE_PROBE, "yes" if denied else "no"], check=False, timeout=60
    )
    if result.returncode == 3:
        pytest.skip("this kernel has no PR_SET_MDWE")
    assert result.returncode == 0, result.stderr
