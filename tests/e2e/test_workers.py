"""``workers = 2`` with real processes: skopeo pulls through the workers; a
worker killed mid-transfer elsewhere is replaced while the transfer goes
on; reload (broken and good) and stop with the unit's command line; one
access log across workers; workers die with their supervisor.

A request lands on whichever worker accepts it first (one shared accept
queue), so the tests find which worker holds a connection through
``/proc`` rather than assume one."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Images, Mirror, Skopeo, start_mirror, verify_dir_copy
from tests.e2e.test_systemd import (
    UNIT,
    Notifications,
    SlowDownload,
    _logged,
    _manifest_status,
    _serving_certificate,
    _unit_value,
)
from tests.support.pki import Pki, make_pki
from tests.support.processes import Process, free_port, twistd


def _workers(parent: int) -> list[int]:
    """The supervisor's children: its workers."""
    try:
        text = Path(f"/proc/{parent}/task/{parent}/children").read_text()
    except FileNotFoundError:
        return []
    return sorted(int(pid) for pid in text.split())


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def _wait(condition, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _owner(server_port: int, client: socket.socket, pids: list[int]) -> int | None:
    """The pid among ``pids`` holding the server side of ``client``'s connection."""
    client_port = client.getsockname()[1]
    inode = None
    table = Path("/proc/net/tcp").read_text().splitlines()[1:]
    table += Path("/proc/net/tcp6").read_text().splitlines()[1:]  # a dual-stack listener
    for line in table:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == (
            client_port
        ):
            inode = fields[9]
    if inode is None:
        return None
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
        except FileNotFoundError:
            continue
    return None


def _events(output: str) -> list[dict]:
    events = []
    for line in output.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return events


def _healthz(port: int, ca: Path) -> tuple[socket.socket, bytes]:
    """A kept-open TLS connection that got /healthz's answer."""
    context = ssl.create_default_context(cafile=str(ca))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
    tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while not answer.endswith(b"ok\n"):
        data = tls.recv(4096)
        if not data:
            break
        answer += data
    return tls, answer


def _served_by(port: int, ca: Path, pids: list[int], wanted: int, attempts: int = 60) -> bool:
    """Whether some of up to ``attempts`` new connections is answered by ``wanted``."""
    held = []
    try:
        for _ in range(attempts):
            tls, answer = _healthz(port, ca)
            held.append(tls)
            assert answer.startswith(b"HTTP/1.1 200"), answer
            if _owner(port, tls, pids) == wanted:
                return True
        return False
    finally:
        for tls in held:
            tls.close()


def test_skopeo_pulls_through_two_workers(
    workdir: Path, pki: Pki, registry: str, skopeo: Skopeo, test_images: Images
) -> None:
    """With --workers 2 two worker processes serve, and skopeo copies whole images
    (every blob checked against its digest) through them."""
    mirror = start_mirror(workdir, pki, [registry], "workers-pull", "--workers", "2")
    try:
        workers = _wait(lambda: len(_workers(mirror.pid)) == 2 and _workers(mirror.pid), "2")
        for attempt in range(3):
            dest = workdir / f"workers-pull-{attempt}"
            skopeo.copy(f"{mirror.address}/library/alpine:latest", dest)
            assert verify_dir_copy(dest) == len(test_images.alpine.blobs) - 1
        dest = workdir / "workers-pull-multi"
        skopeo.copy(f"{mirror.address}/library/multi:latest", dest, "--all")
        assert verify_dir_copy(dest) == len(test_images.multi.blobs) - 1
        served = {e.get("worker") for e in _events(mirror.output()) if e.get("status") == 200}
        assert served and served <= {1, 2}, served
        assert _workers(mirror.pid) == workers
    finally:
        assert mirror.stop() == 0


def test_killed_worker_is_replaced_while_another_downloads(workdir: Path, pki: Pki, hubs) -> None:
    """SIGKILL to one worker: a download through the other completes with the right
    digest, and a new worker takes the dead one's place and answers requests."""
    from tests.e2e.test_hub import _get_token

    hub, _ = hubs
    mirror = start_mirror(workdir, pki, [hub.url], "workers-kill", "--workers", "2")
    try:
        _wait(lambda: len(_workers(mirror.pid)) == 2, "two workers")
        _wait(lambda: "all 2 workers listen" in mirror.output(), "workers listening")
        token = _get_token(mirror, pki, "repository:library/alpine:pull")
        download = SlowDownload(mirror.port, pki, hub.big_digest, token)
        download.read(8 << 20)
        workers = _workers(mirror.pid)
        downloading = _owner(mirror.port, download.tls, workers)
        assert downloading in workers
        (victim,) = [pid for pid in workers if pid != downloading]

        os.kill(victim, signal.SIGKILL)
        replaced = _wait(
            lambda: (w := _workers(mirror.pid)) and len(w) == 2 and victim not in w and w,
            "a new worker",
        )
        (newcomer,) = [pid for pid in replaced if pid != downloading]
        download.read()
        assert download.received == hub.big_size
        assert download.digest() == hub.big_digest
        assert re.search(rf"worker \d \(pid {victim}\) was killed by signal 9", mirror.output())
        _wait(lambda: f"(pid {newcomer}) listens" in mirror.output(), "the new worker listening")
        assert _served_by(mirror.port, pki.ca, replaced, newcomer)
    finally:
        assert mirror.stop() == 0


def _unit_daemon(workdir: Path, name: str, config: Path, port: int, notify: Notifications):
    """The daemon as the unit's ExecStart runs it, with ``config``."""
    argv = shlex.split(_unit_value("ExecStart"))
    assert argv[0] == "/opt/mirrord/bin/twistd" and argv[-1] == "/etc/mirrord/mirrord.toml"
    argv = [twistd(), *argv[1:-1], str(config)]
    return Process(
        name, argv, port, workdir / f"{name}.log", env={"NOTIFY_SOCKET": str(notify.path)}
    ).start()


def test_unit_wants_mixed_kill_mode_and_main_notify_access() -> None:
    """The unit lets the supervisor alone get systemd's SIGTERM and talk to systemd."""
    assert _unit_value("KillMode") == "mixed"
    assert _unit_value("NotifyAccess") == "main"
    assert "workers" in UNIT.read_text()


def test_unit_command_line_reload_with_workers(workdir: Path, pki: Pki, hubs) -> None:
    """With the unit's command line and workers = 2: one READY=1; a broken file on
    SIGHUP reaches no worker (all keep the old certificate and upstream, and a worker
    started after it still starts); a good file changes every worker; SIGTERM lets
    a download finish and exits 0 with every worker gone."""
    from tests.e2e.test_hub import _get_token

    hub, second = hubs
    tls_dir = workdir / "workers-tls"
    tls_dir.mkdir()
    cert, key = tls_dir / "fullchain.pem", tls_dir / "privkey.pem"
    shutil.copy(pki.fullchain, cert)
    shutil.copy(pki.privkey, key)
    port = free_port()
    config = workdir / "workers-unit.toml"
    settings = (
        f'listen = ["tcp:{port}:interface=127.0.0.1"]\ncert = "{cert}"\nkey = "{key}"\n'
        f'state_dir = "{workdir / "state-workers-unit"}"\ngrace_period = 60\nworkers = 2\n'
        # Pass-through: every manifest GET reaches the upstream, to count.
        "[cache]\nenabled = false\n"
        '[registries."docker.io"]\nupstreams = ["{upstream}"]\n'
    )
    config.write_text(settings.replace("{upstream}", hub.url))
    notifications = Notifications(workdir / "workers-notify.sock")
    daemon = _unit_daemon(workdir, "workers-unit", config, port, notifications)
    try:
        notifications.expect("READY=1")
        _logged(daemon, "all 2 workers listen")
        notifications.sock.settimeout(1)
        with pytest.raises(TimeoutError):
            notifications.sock.recv(4096)  # READY=1 once, not once per worker
        notifications.sock.settimeout(15)
        workers = _workers(daemon.pid)
        assert len(workers) == 2
        mirror = Mirror("workers-unit", [], port, daemon.log)
        token = _get_token(mirror, pki, "repository:library/alpine:pull")

        # A broken file: refused by the supervisor, no worker reloads.
        broken = settings.replace("workers = 2", "workers = 0")
        config.write_text(broken.replace("{upstream}", second.url))
        hub_before = hub.control()["counts"].get("GET manifests", 0)
        second_before = second.control()["counts"].get("GET manifests", 0)
        os.kill(daemon.pid, signal.SIGHUP)
        notifications.expect("RELOADING=1")
        notifications.expect("READY=1")
        _logged(daemon, "reload (SIGHUP) refused")
        _logged(daemon, "key 'workers' must be >= 1")
        assert not [e for e in _events(daemon.output()) if "reloaded" in e.get("message", "")]
        # A worker started now reads the copy the supervisor last found good.
        os.kill(workers[0], signal.SIGKILL)
        _wait(lambda: len(w := _workers(daemon.pid)) == 2 and workers[0] not in w, "replaced")
        _wait(lambda: daemon.output().count(") listens") == 3, "the new worker listening")
        workers = _workers(daemon.pid)
        for _ in range(6):
            assert _manifest_status(port, pki.ca, token) == 200
        # (A worker's first GET may be asked twice: 401, then with a token.)
        assert hub.control()["counts"].get("GET manifests", 0) >= hub_before + 6
        assert second.control()["counts"].get("GET manifests", 0) == second_before

        # A good file: every worker takes the new certificate and upstream.
        other = make_pki(workdir / "pki-workers-renewed", "renewed")
        shutil.copy(other.fullchain, cert)
        shutil.copy(other.privkey, key)
        config.write_text(settings.replace("{upstream}", second.url))
        hub_before = hub.control()["counts"].get("GET manifests", 0)
        os.kill(daemon.pid, signal.SIGHUP)
        notifications.expect("RELOADING=1")
        notifications.expect("READY=1")
        reloaded = {
            e.get("worker")
            for e in _events(daemon.output())
            if e.get("message", "").startswith("reloaded: certificate")
        }
        assert reloaded == {1, 2}
        for _ in range(12):  # every connection, whichever worker takes it
            _serving_certificate(port, other.ca)
        assert _served_by(port, other.ca, workers, workers[0])
        assert _served_by(port, other.ca, workers, workers[1])
        for _ in range(6):
            assert _manifest_status(port, other.ca, token) == 200
        assert second.control()["counts"].get("GET manifests", 0) >= second_before + 6
        assert hub.control()["counts"].get("GET manifests", 0) == hub_before

        config.write_text(settings.replace("{upstream}", hub.url))  # it has the big blob
        os.kill(daemon.pid, signal.SIGHUP)
        notifications.expect("RELOADING=1")
        notifications.expect("READY=1")
        draining = SlowDownload(port, other, hub.big_digest, token)
        draining.read(8 << 20)
        os.kill(daemon.pid, signal.SIGTERM)
        notifications.expect("STOPPING=1")
        draining.read()
        assert draining.digest() == hub.big_digest
        assert daemon.proc.wait(30) == 0
        assert not any(_alive(pid) for pid in workers)
    finally:
        daemon.stop()


def test_access_log_is_one_file_across_workers(workdir: Path, pki: Pki) -> None:
    """Every worker appends whole lines to the one access log; after logrotate's rename,
    SIGUSR1 to the supervisor makes every worker reopen it."""
    log = workdir / "workers-logs" / "access.log"
    config = workdir / "workers-accesslog.toml"
    config.write_text(f'access_log = "{log}"\n')
    mirror = start_mirror(
        workdir,
        pki,
        ["http://127.0.0.1:9"],
        "workers-log",
        "--config",
        str(config),
        "--workers",
        "2",
    )
    line = re.compile(r'127\.0\.0\.1 - - \[[^]]+\] "GET /healthz HTTP/1\.1" 200 3 "-" "-"')
    try:
        _wait(lambda: "all 2 workers listen" in mirror.output(), "workers listening")
        workers = _workers(mirror.pid)
        assert _served_by(mirror.port, pki.ca, workers, workers[0])
        assert _served_by(mirror.port, pki.ca, workers, workers[1])
        before = log.read_text().splitlines()
        assert before and all(line.fullmatch(text) for text in before), before[:3]

        log.rename(log.with_suffix(".log.1"))
        os.kill(mirror.pid, signal.SIGUSR1)
        _wait(
            lambda: (
                {
                    e.get("worker")
                    for e in _events(mirror.output())
                    if e.get("message", "").startswith("reopened")
                }
                == {1, 2}
            ),
            "both workers reopening",
        )
        assert _served_by(mirror.port, pki.ca, workers, workers[0])
        assert _served_by(mirror.port, pki.ca, workers, workers[1])
        after = log.read_text().splitlines()
        assert after and all(line.fullmatch(text) for text in after), after[:3]
        assert log.with_suffix(".log.1").read_text().splitlines() == before
    finally:
        assert mirror.stop() == 0


def test_workers_die_with_their_supervisor(workdir: Path, pki: Pki) -> None:
    """When the supervisor is killed outright, its workers exit too and free the port."""
    mirror = start_mirror(workdir, pki, ["http://127.0.0.1:9"], "workers-orphan", "--workers", "2")
    try:
        _wait(lambda: "all 2 workers listen" in mirror.output(), "workers listening")
        workers = _workers(mirror.pid)
        os.kill(mirror.pid, signal.SIGKILL)
        mirror.proc.wait(10)
        _wait(lambda: not any(_alive(pid) for pid in workers), "orphans gone")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", mirror.port), timeout=2).close()
    finally:
        mirror.stop()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_stop_sends_what_a_finished_response_left_in_buffers(
    workdir: Path, pki: Pki, hubs, workers: str
) -> None:
    """SIGTERM during a pass-through download to a slow reader: the client still gets
    every byte (the last ones sat in the connection's buffer after the response
    finished), and the daemon exits 0."""
    from tests.e2e.test_hub import _get_token

    hub, _ = hubs
    mirror = start_mirror(
        workdir,
        pki,
        [hub.url],
        f"workers-flush-{workers}",
        "--workers",
        workers,
        config="[cache]\nenabled = false\n",
    )
    try:
        _wait(lambda: _healthz(mirror.port, pki.ca)[1].startswith(b"HTTP/1.1 200"), "listening")
        token = _get_token(mirror, pki, "repository:library/alpine:pull")
        download = SlowDownload(mirror.port, pki, hub.big_digest, token)
        download.read(8 << 20)
        os.kill(mirror.pid, signal.SIGTERM)
        download.read()
        assert download.received == hub.big_size
        assert download.digest() == hub.big_digest
        assert mirror.proc.wait(30) == 0
    finally:
        mirror.stop()


def _certificate_of(port: int, workers: list[int]) -> dict[int, int]:
    """The serial each worker shows a client naming the ACME domain (new
    connections until every worker was seen, or a bound)."""
    from tests.e2e.test_acme import DOMAIN

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    seen: dict[int, int] = {}
    for _ in range(60):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname=DOMAIN) as tls:
                owner = _owner(port, tls, workers)
                der = tls.getpeercert(binary_form=True)
                if owner is not None and der is not None:
                    from cryptography import x509

                    seen[owner] = x509.load_der_x509_certificate(der).serial_number
        if len(seen) == len(workers):
            break
    return seen


def test_acme_with_workers_every_worker_serves_the_issued_and_renewed(
    workdir: Path, pki: Pki
) -> None:
    """workers = 2 with ACME (TLS-ALPN-01 on the shared listener): the certificate
    worker 1 obtains, and the one it renews, are served by every worker."""
    from tests.e2e.test_acme import issuer, served_certificate, start_acme_mirror, start_pebble

    port = free_port()
    pebble = start_pebble(workdir, pki, "workers", port, validity=60)
    try:
        mirror, _ = start_acme_mirror(
            workdir, pki, "workers", port, pebble, "acme_renew_before = 50\n", workers="2"
        )
        try:
            _wait(lambda: "all 2 workers listen" in mirror.output(), "workers listening")
            workers = _workers(mirror.pid)
            _wait(lambda: issuer(served_certificate(port)).startswith("Pebble"), "issuance", 60)
            _wait(lambda: mirror.output().count("reloaded: certificate") >= 2, "reloads", 20)
            first = _certificate_of(port, workers)
            assert sorted(first) == workers
            assert len(set(first.values())) == 1, first
            (serial,) = set(first.values())
            _wait(lambda: served_certificate(port).serial_number != serial, "a renewal", 60)
            _wait(
                lambda: (
                    len(set((now := _certificate_of(port, workers)).values())) == 1
                    and serial not in now.values()
                    and sorted(now) == workers
                ),
                "every worker on the renewed certificate",
                20,
            )
            assert "renewed the ACME certificate" in mirror.output()
        finally:
            assert mirror.stop() == 0
    finally:
        pebble.stop()
