"""Two real ``twistd mirrord`` workers of one host, started as the
supervisor starts them (``MIRRORD_WORKER``, ``MIRRORD_WORKERS``, one
``MIRRORD_SHARED_DIR`` and ``PROMETHEUS_MULTIPROC_DIR``) but each on its
own port and state directory: /metrics and the status page show the same
totals in either, and the per-client limits hold across both."""

from __future__ import annotations

import base64
import re
import shutil
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrord.passwords import make_hash
from tests.e2e.conftest import Mirror, Skopeo, start_mirror
from tests.e2e.test_pull import _raw_tls
from tests.support.pki import Pki

PROBE = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def start_workers(workdir: Path, pki: Pki, name: str, config: str) -> list[Mirror]:
    """Workers 1 and 2 of 2 sharing ``workdir/<name>-shared``, emptied first."""
    shared = workdir / f"{name}-shared"
    shutil.rmtree(shared, ignore_errors=True)
    (shared / "metrics").mkdir(parents=True)
    started: list[Mirror] = []
    try:
        for index in (1, 2):
            env = {
                "MIRRORD_WORKER": str(index),
                "MIRRORD_WORKERS": "2",
                "MIRRORD_SHARED_DIR": str(shared),
                "PROMETHEUS_MULTIPROC_DIR": str(shared / "metrics"),
            }
            started.append(
                start_mirror(workdir, pki, [], f"{name}-{index}", config=config, env=env)
            )
    except BaseException:
        for mirror in started:
            mirror.stop()
        raise
    return started


@pytest.fixture
def workers(workdir: Path, pki: Pki, registry: str) -> Iterator[list[Mirror]]:
    config = (
        "[access]\nmax_connections_per_client = 2\n"
        f'[registries."docker.io"]\nupstreams = ["{registry}"]\n'
    )
    mirrors = start_workers(workdir, pki, "workers", config)
    yield mirrors
    for mirror in mirrors:
        mirror.stop()


def fetch(mirror: Mirror, pki: Pki, path: str) -> str:
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPSHandler(context=mirror.tls_context(pki)),
    )
    request = urllib.request.Request(
        f"https://{mirror.address}{path}", headers={"Accept-Language": "en"}
    )
    with opener.open(request, timeout=10) as answer:
        return answer.read().decode()


def scrape(mirror: Mirror, pki: Pki) -> dict[str, float]:
    text = fetch(mirror, pki, "/metrics")
    return {
        name: float(value)
        for name, value in re.findall(r"(?m)^(mirrord_\S+) (\S+)$", text)
        # Each worker's cache is its own state directory here.
        if not name.startswith(("mirrord_cache_size", "mirrord_cache_entries"))
    }


def traffic(page: str) -> str:
    """The status section after its cache row: the traffic, fills, upstreams."""
    section = page[page.index('<section id="status">') :]
    return section[section.index("</table>") : section.index("</section>")]


def test_metrics_are_one_stream(workers: list[Mirror], pki: Pki, skopeo: Skopeo) -> None:
    """Pulls through either worker show in /metrics and on the status page of both, alike."""
    one, two = workers
    skopeo.inspect(f"{one.address}/library/alpine:latest")
    after_one = scrape(two, pki)  # the other worker tells what the first did
    manifests = 'mirrord_requests_total{kind="manifests"}'
    assert after_one[manifests] >= 1, after_one
    assert "no requests" not in traffic(fetch(two, pki, "/"))
    skopeo.inspect(f"{two.address}/library/alpine:latest")
    seen = [scrape(mirror, pki) for mirror in workers]
    assert seen[0] == seen[1]
    assert seen[0][manifests] == 2 * after_one[manifests]
    assert seen[0]['mirrord_cache_results_total{result="MISS"}'] >= 2
    assert traffic(fetch(one, pki, "/")) == traffic(fetch(two, pki, "/"))


def _status(mirror: Mirror, pki: Pki) -> int:
    return int(_raw_tls(mirror, pki, PROBE)[0].split(b" ", 2)[1])


def test_connection_limit_holds_across_workers(workers: list[Mirror], pki: Pki) -> None:
    """One connection held in each worker: a third in either is over the limit of 2."""
    held = []
    try:
        for mirror in workers:
            raw = socket.create_connection(("127.0.0.1", mirror.port), timeout=10)
            held.append(mirror.tls_context(pki).wrap_socket(raw, server_hostname="127.0.0.1"))
        for mirror in workers:
            deadline = time.monotonic() + 5  # the held connections are counted at once
            while (status := _status(mirror, pki)) != 429:
                assert time.monotonic() < deadline, status
                time.sleep(0.1)
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5  # let the workers see those connections go
    while (status := _status(workers[1], pki)) != 200:
        assert time.monotonic() < deadline, status
        time.sleep(0.1)


def _login(mirror: Mirror, pki: Pki, password: str) -> int:
    credentials = base64.b64encode(f"ops:{password}".encode()).decode()
    answer, _ = _raw_tls(
        mirror,
        pki,
        f"GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {credentials}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    return int(answer.split(b" ", 2)[1])


def test_failed_logins_count_across_workers(workdir: Path, pki: Pki, registry: str) -> None:
    """Two wrong guesses in one worker and one in the other: both refuse the right password."""
    config = (
        "[access]\nmax_failed_logins = 3\nfailed_login_window = 60\n"
        f'[access.users]\nops = "{make_hash("s3cret")}"\n'
        f'[registries."docker.io"]\nupstreams = ["{registry}"]\n'
    )
    one, two = start_workers(workdir, pki, "worker-logins", config)
    try:
        assert _login(two, pki, "s3cret") == 200
        assert [_login(one, pki, "guess1"), _login(one, pki, "guess2")] == [401, 401]
        assert _login(two, pki, "guess3") == 401
        assert _login(two, pki, "s3cret") == 429
        assert _login(one, pki, "s3cret") == 429
    finally:
        one.stop()
        two.stop()
