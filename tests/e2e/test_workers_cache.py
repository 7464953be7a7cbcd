"""``workers = 2`` on one cache: concurrent misses of one blob in both
workers make one upstream fetch, and every client gets the whole blob.

The kernel gives a new connection to whichever worker accepts first, so the
test opens connections until each worker holds eight (found through
``/proc``), then asks for the blob on all sixteen at once."""

from __future__ import annotations

import ssl
from pathlib import Path

from tests.e2e.conftest import start_mirror
from tests.e2e.test_shared_cache import BIG, _held_pulls, shared_hub
from tests.e2e.test_workers import _events, _healthz, _owner, _wait, _workers
from tests.support.pki import Pki

__all__ = ["shared_hub"]  # the fixture, used by name

PER_WORKER = 8


def _connections(port: int, ca: Path, workers: list[int]) -> dict[int, list[ssl.SSLSocket]]:
    """Kept-open TLS connections, ``PER_WORKER`` held by each worker."""
    held: dict[int, list[ssl.SSLSocket]] = {pid: [] for pid in workers}
    spare = []
    for _ in range(200):
        if all(len(c) >= PER_WORKER for c in held.values()):
            break
        tls, answer = _healthz(port, ca)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        owner = _owner(port, tls, workers)
        if owner in held and len(held[owner]) < PER_WORKER:
            held[owner].append(tls)
        else:
            spare.append(tls)
    for tls in spare:
        tls.close()
    assert all(len(c) == PER_WORKER for c in held.values()), {p: len(c) for p, c in held.items()}
    return held


def _get(tls: ssl.SSLSocket, digest: str, size: int) -> tuple[bytes, bytes]:
    """The blob on an open connection: its status line and its body."""
    tls.settimeout(60)
    tls.sendall(
        f"GET /v2/library/alpine/blobs/{digest} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    parts, received = [body], len(body)
    try:
        while received < size:
            chunk = tls.recv(1 << 20)
            if not chunk:
                break
            parts.append(chunk)
            received += len(chunk)
    except OSError:
        pass
    tls.close()
    return head.split(b"\r\n", 1)[0], b"".join(parts)


def test_concurrent_misses_in_two_workers_make_one_upstream_fetch(
    workdir: Path, pki: Pki, shared_hub
) -> None:
    """Eight clients on each of two workers ask for one uncached blob at
    once: the Hub sees one blob GET, all sixteen get the right bytes, and
    both workers answered."""
    hub, big, _ = shared_hub
    mirror = start_mirror(workdir, pki, [hub.url], "workers-one-fetch", "--workers", "2")
    try:
        workers = _wait(lambda: len(_workers(mirror.pid)) == 2 and _workers(mirror.pid), "2")
        _wait(lambda: "all 2 workers listen" in mirror.output(), "workers listening")
        held = _connections(mirror.port, pki.ca, workers)
        # Every request in, in both workers, before the body goes on.
        results, before, after = _held_pulls(
            hub,
            [
                lambda tls=tls: _get(tls, big.digest, BIG)
                for connections in held.values()
                for tls in connections
            ],
        )
        for result in results:
            assert isinstance(result, tuple), result
            status, body = result
            assert status.startswith(b"HTTP/1.1 200"), status
            assert body == big.data
        assert after.get("GET blobs", 0) - before.get("GET blobs", 0) == 1
        assert after.get("cdn GET", 0) - before.get("cdn GET", 0) == 1
        answered = {
            e.get("worker")
            for e in _events(mirror.output())
            if big.digest in str(e.get("path", e.get("uri", ""))) and e.get("status") == 200
        }
        assert answered == {1, 2}, answered
    finally:
        assert mirror.stop() == 0
