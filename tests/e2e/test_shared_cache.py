"""Two ``twistd mirrord`` daemons sharing one ``[cache] path`` in front of
the fake Hub: a blob is fetched once for both, a daemon killed mid-fill
leaves the other's clients whole or cleanly cut, the size limit holds for
both together, a tag one learned is served stale by the other, and one's
restart scan leaves the other's fill alone."""

from __future__ import annotations

import hashlib
import http.client
import os
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import Hub, Images, Mirror, start_mirror
from tests.support.pki import Pki
from tests.support.processes import Process, free_port

BIG = 24 << 20
SMALL = 6 << 20
HOLD = 1 << 20


@dataclass
class Blob:
    digest: str
    data: bytes


def _blob(path: Path, size: int) -> Blob:
    data = os.urandom(size)
    path.write_bytes(data)
    return Blob("sha256:" + hashlib.sha256(data).hexdigest(), data)


@pytest.fixture(scope="module")
def shared_hub(workdir: Path, test_images: Images) -> Iterator[tuple[Hub, Blob, list[Blob]]]:
    """A fake Hub of its own (its counters are this module's), without auth:
    alpine, one 24 MiB blob and four of 6 MiB."""
    directory = workdir / "shared-blobs"
    directory.mkdir(exist_ok=True)
    big = _blob(directory / "big", BIG)
    smalls = [_blob(directory / f"small{i}", SMALL) for i in range(4)]
    port, cdn = free_port(), free_port()
    argv = [
        sys.executable,
        "-m",
        "tests.support.fakehub",
        "--port",
        str(port),
        "--cdn-port",
        str(cdn),
        "--no-auth",
        "--image",
        f"library/alpine={test_images.alpine.path}:latest",
    ]
    for blob, name in [(big, "big"), *((s, f"small{i}") for i, s in enumerate(smalls))]:
        argv += ["--blob", f"{blob.digest}={directory / name}"]
    process = Process("shared-hub", argv, port, workdir / "shared-hub.log").start()
    yield Hub(f"http://127.0.0.1:{port}", process, big.digest, BIG), big, smalls
    process.stop()


def _pair(workdir: Path, pki: Pki, hub: Hub, name: str, cache: str = "") -> list[Mirror]:
    """Two daemons, their own state directories, one cache directory."""
    shared = workdir / f"{name}-cache"
    config = f'[cache]\npath = "{shared}"\n{cache}'
    return [start_mirror(workdir, pki, [hub.url], f"{name}-{side}", config=config) for side in "ab"]


@dataclass
class Fetched:
    status: bytes
    body: bytes
    complete: bool


def _fetch(context: ssl.SSLContext, port: int, digest: str, size: int) -> Fetched:
    """One GET of a blob; ``complete`` when the whole announced body came."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=60)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(
            f"GET /v2/library/alpine/blobs/{digest} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            parts = [body]
            received = len(body)
            while received < size:
                chunk = tls.recv(1 << 20)
                if not chunk:
                    break
                parts.append(chunk)
                received += len(chunk)
        except (OSError, ssl.SSLError):
            head, parts = data.partition(b"\r\n\r\n")[0], [data.partition(b"\r\n\r\n")[2]]
    body = b"".join(parts)
    return Fetched(head.split(b"\r\n", 1)[0], body, len(body) == size)


def _in_parallel(jobs: list) -> list:
    results: list = [None] * len(jobs)

    def run(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as e:  # reported by the caller
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    return [threads, results]


def _join(started: list, timeout: float = 120) -> list:
    threads, results = started
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.1, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a client hung"
    return results


def _held_pulls(hub: Hub, jobs: list) -> tuple[list, dict, dict]:
    """Run ``jobs`` (clients of one uncached blob) at once, every one of
    them in before the fake Hub lets the held CDN body go on; their
    results, and the Hub's counts before and after."""
    before = hub.control(cdn_hold_at=HOLD)["counts"]
    try:
        started = _in_parallel(jobs)
        _wait_for(lambda: hub.control()["counts"].get("cdn GET", 0) > before.get("cdn GET", 0))
        time.sleep(2)  # every request in before the held body goes on
        hub.control(cdn_hold_at=None, release_cdn=True)
        results = _join(started)
    finally:
        hub.control(cdn_hold_at=None, release_cdn=True)
    return results, before, hub.control()["counts"]


def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _blob_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in (cache / "blobs").glob("*/*/*/data"))


def test_sixteen_clients_over_two_daemons_make_one_upstream_fetch(
    workdir: Path, pki: Pki, shared_hub
) -> None:
    """16 concurrent clients of one uncached blob, 8 on each daemon, all get
    the right bytes, and the Hub saw exactly one blob GET."""
    hub, big, _ = shared_hub
    context = ssl.create_default_context(cafile=str(pki.ca))
    mirrors = _pair(workdir, pki, hub, "sixteen")
    try:
        results, before, after = _held_pulls(
            hub,
            [lambda m=mirrors[i % 2]: _fetch(context, m.port, big.digest, BIG) for i in range(16)],
        )
    finally:
        for mirror in mirrors:
            mirror.stop()
    for result in results:
        assert isinstance(result, Fetched), result
        assert result.status.startswith(b"HTTP/1.1 200"), result.status
        assert result.complete and result.body == big.data
    assert after.get("GET blobs", 0) - before.get("GET blobs", 0) == 1
    assert after.get("cdn GET", 0) - before.get("cdn GET", 0) == 1
    logs = mirrors[0].output() + mirrors[1].output()
    assert "cache=COALESCED" in logs


def test_killed_filler_leaves_the_others_clients_whole_or_cut(
    workdir: Path, pki: Pki, shared_hub
) -> None:
    """SIGKILL the daemon filling a blob: the other daemon's clients end
    with a clean cut (never a whole unverified blob), and the next pull
    through it completes, verified."""
    hub, big, _ = shared_hub
    context = ssl.create_default_context(cafile=str(pki.ca))
    filler, follower = _pair(workdir, pki, hub, "killed", "[timeouts]\nbody_idle = 30\n")
    cache = workdir / "killed-cache"
    before = hub.control(cdn_hold_at=HOLD)["counts"]
    try:
        first = _in_parallel([lambda: _fetch(context, filler.port, big.digest, BIG)])
        _wait_for(lambda: hub.control()["counts"].get("cdn GET", 0) > before.get("cdn GET", 0))
        _wait_for(lambda: any((cache / "tmp").glob("*.fill")))
        followers = _in_parallel(
            [lambda: _fetch(context, follower.port, big.digest, BIG) for _ in range(4)]
        )
        time.sleep(1.5)  # following the held file
        os.kill(filler.pid, signal.SIGKILL)
        filler.proc.wait(10)
        cut = _join(followers, timeout=30)
        _join(first, timeout=30)
        hub.control(cdn_hold_at=None, release_cdn=True)
        again = _fetch(context, follower.port, big.digest, BIG)
    finally:
        hub.control(cdn_hold_at=None, release_cdn=True)
        filler.stop()
        follower.stop()
    for result in cut:
        assert isinstance(result, Fetched), result
        assert not result.complete, "a whole blob was sent from an unverified fill"
        assert big.data.startswith(result.body)
    assert again.complete and again.body == big.data
    assert "the process filling it stopped without a verified blob" in follower.output()


def test_restart_scan_of_one_leaves_the_others_fill(workdir: Path, pki: Pki, shared_hub) -> None:
    """A daemon starting on the shared cache while the other fills a blob
    does not remove that fill's file: the fill is published, and the new
    daemon then serves the blob (a hit, or following the kept fill) without
    another upstream GET."""
    hub, _, smalls = shared_hub
    blob = smalls[0]
    context = ssl.create_default_context(cafile=str(pki.ca))
    shared = workdir / "scan-cache"
    config = f'[cache]\npath = "{shared}"\n'
    filler = start_mirror(workdir, pki, [hub.url], "scan-a", config=config)
    before = hub.control(cdn_hold_at=HOLD)["counts"]
    late = None
    try:
        first = _in_parallel([lambda: _fetch(context, filler.port, blob.digest, SMALL)])
        _wait_for(lambda: any((shared / "tmp").glob("*.fill")))
        late = start_mirror(workdir, pki, [hub.url], "scan-b", config=config)
        hub.control(cdn_hold_at=None, release_cdn=True)
        [whole] = _join(first)
        again = _fetch(context, late.port, blob.digest, SMALL)
        after = hub.control()["counts"]
    finally:
        hub.control(cdn_hold_at=None, release_cdn=True)
        filler.stop()
        if late is not None:
            late.stop()
    assert whole.complete and whole.body == blob.data
    assert again.complete and again.body == blob.data
    assert after.get("GET blobs", 0) - before.get("GET blobs", 0) == 1
    # A hit, or (when the other's client had its last byte before the fill
    # was linked in place) a follow of the kept fill: either way no GET.
    assert "cache=HIT" in late.output() or "cache=COALESCED" in late.output()
    assert "removed 0 leftovers" in late.output()


def test_size_limit_holds_for_both_daemons_together(workdir: Path, pki: Pki, shared_hub) -> None:
    """Blobs pulled alternately through two daemons on one 20 MB cache: the
    blobs on disk stay under 20 MB together, the latest one still cached."""
    hub, _, smalls = shared_hub
    context = ssl.create_default_context(cafile=str(pki.ca))
    mirrors = _pair(workdir, pki, hub, "evict", 'max_size = "20MB"\n')
    cache = workdir / "evict-cache"
    try:
        for i, blob in enumerate(smalls):
            got = _fetch(context, mirrors[i % 2].port, blob.digest, SMALL)
            assert got.complete and got.body == blob.data
            hexdigest = blob.digest.split(":", 1)[1]
            latest = cache / "blobs" / "sha256" / hexdigest[:2] / hexdigest / "data"
            _wait_for(lambda latest=latest: latest.exists())
            _wait_for(lambda: _blob_bytes(cache) <= 20_000_000, timeout=10)
            sizes = _blob_bytes(cache)
            assert sizes <= 20_000_000, sizes
        assert latest.exists()
    finally:
        for mirror in mirrors:
            mirror.stop()
    logs = mirrors[0].output() + mirrors[1].output()
    assert "Traceback" not in logs


ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


def _manifest(context: ssl.SSLContext, port: int) -> tuple[int, bytes, str]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    try:
        conn.request("GET", "/v2/library/alpine/manifests/latest", headers={"Accept": ACCEPT})
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("Warning") or ""
    finally:
        conn.close()


def test_tag_fetched_by_one_is_served_stale_by_the_other(
    workdir: Path, pki: Pki, shared_hub
) -> None:
    """A tag pulled through one daemon is answered by the other, which never
    pulled it, from the shared cache while the upstream is down (stale)."""
    hub, _, _ = shared_hub
    context = ssl.create_default_context(cafile=str(pki.ca))
    first, other = _pair(workdir, pki, hub, "stale", "tag_ttl = 0\n")
    try:
        status, body, _ = _manifest(context, first.port)
        assert status == 200
        _wait_for(lambda: any((workdir / "stale-cache" / "tags").glob("*/**/latest.json")))
        hub.control(outage=True)
        try:
            status, stale, warning = _manifest(context, other.port)
        finally:
            hub.control(outage=False)
    finally:
        first.stop()
        other.stop()
    assert (status, stale) == (200, body)
    assert "Stale" in warning
    assert "cache=STALE" in other.output()
