"""Clients that open a cached blob and stop reading, against a real daemon:
they must cost little memory each and must not slow anyone else's pull."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import ssl
import time
from pathlib import Path

from tests.e2e.conftest import Mirror, start_mirror
from tests.support.pki import Pki

STALLED = 64


def _rss_kib(mirror: Mirror) -> int:
    for line in Path(f"/proc/{mirror.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _settled_rss_kib(mirror: Mirror, seconds: float = 10.0) -> int:
    """VmRSS once it stops moving (bounded wait)."""
    deadline = time.monotonic() + seconds
    last = _rss_kib(mirror)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = _rss_kib(mirror)
        if abs(now - last) < 256:
            return now
        last = now
    return last


def _token(context: ssl.SSLContext, port: int) -> str:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    conn.request("GET", "/v2/")
    conn.getresponse().read()
    conn.request("GET", "/token?service=fakehub&scope=repository:library/alpine:pull")
    response = conn.getresponse()
    assert response.status == 200
    return json.loads(response.read())["token"]


def _request(context: ssl.SSLContext, port: int, digest: str, token: str) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
    tls.sendall(
        f"GET /v2/library/alpine/blobs/{digest} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode()
    )
    return tls


def _pull(context: ssl.SSLContext, port: int, digest: str, size: int) -> float:
    """Seconds for one whole pull of the blob; checks every byte."""
    started = time.monotonic()
    hasher = hashlib.sha256()
    with _request(context, port, digest, _token(context, port)) as tls:
        head = b""
        while b"\r\n\r\n" not in head:
            head += tls.recv(65536)
        head, _, body = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        hasher.update(body)
        received = len(body)
        while received < size:
            data = tls.recv(1 << 20)
            if not data:
                break
            hasher.update(data)
            received += len(data)
    assert received == size
    assert "sha256:" + hasher.hexdigest() == digest
    return time.monotonic() - started


def test_stalled_readers_of_a_cached_blob_cost_little(workdir: Path, pki: Pki, hubs) -> None:
    """64 clients that open a cached 256 MiB blob and never read add under 32 MiB to
    the daemon, and a normal pull meanwhile is not slowed down."""
    hub, second = hubs
    context = ssl.create_default_context(cafile=str(pki.ca))
    # Fill the cache with one daemon, then measure a fresh one on the same
    # cache: its heap has not been through a fill.
    filler = start_mirror(workdir, pki, [hub.url, second.url], "stalled")
    try:
        _pull(context, filler.port, hub.big_digest, hub.big_size)
    finally:
        filler.stop()
    mirror = start_mirror(workdir, pki, [hub.url, second.url], "stalled")
    stalled: list[ssl.SSLSocket] = []
    try:
        alone = _pull(context, mirror.port, hub.big_digest, hub.big_size)
        token = _token(context, mirror.port)
        before = _settled_rss_kib(mirror)
        for _ in range(STALLED):
            stalled.append(_request(context, mirror.port, hub.big_digest, token))
        during = _settled_rss_kib(mirror)

        meanwhile = _pull(context, mirror.port, hub.big_digest, hub.big_size)
        per_reader = (during - before) / STALLED
        print(
            f"\nstalled readers: {STALLED}, RSS {before / 1024:.1f} -> {during / 1024:.1f} MiB, "
            f"{per_reader:.0f} KiB each; pull alone {alone:.2f}s, meanwhile {meanwhile:.2f}s"
        )
        assert during - before < 32 * 1024
        assert meanwhile < 3 * alone + 2
        assert "HIT" in mirror.output() or "cache=HIT" in mirror.output()
    finally:
        for tls in stalled:
            tls.close()
        mirror.stop()
