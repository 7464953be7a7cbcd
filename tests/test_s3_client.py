"""The S3 client against a real S3 (a one-node Ceph RGW, tests/support/rgw.py):
objects, ranges, conditional writes, listings, multipart uploads and their
abort, presigned URLs and their expiry, TLS with a private CA, and the
deadline and breaker while the OSD is frozen (RGW then hangs, as S3 does
when its storage stalls).

The client is Twisted-native, so the global reactor runs in a thread of
its own for these tests (no other test runs it) and each call is handed
to it with a bound on the wait."""

from __future__ import annotations

import hashlib
import os
import time
import tracemalloc
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.web.resource import Resource
from twisted.web.server import Site

from mirrord.store.s3 import Breaker, S3Client, S3Error, S3Unavailable, pack_meta, unpack_meta
from mirrord.store.s3.client import read_body
from tests.support.reactorthread import WAIT, call

MIB = 1 << 20


def get_all(client: S3Client, key: str, first: int | None = None, last: int | None = None):
    """(status, body) of a streamed GET, read through deliverBody."""

    async def run() -> tuple[int, bytes]:
        response = await client.get(key, first, last)
        return response.code, await read_body(response, 256 * MIB)

    return Deferred.fromCoroutine(run())


def make_client(reactor: Any, rgw: Any, **kwargs: Any) -> S3Client:
    kwargs.setdefault("prefix", "pre/")
    bucket = kwargs.pop("bucket", None) or rgw.bucket()
    endpoint = kwargs.pop("endpoint", rgw.endpoint)
    return S3Client(reactor, endpoint, bucket, rgw.region, rgw.access_key, rgw.secret_key, **kwargs)


@pytest.fixture
def client(reactor: Any, rgw: Any) -> Iterator[S3Client]:
    c = make_client(reactor, rgw)
    yield c
    call(reactor, c.close)


def test_put_head_get_delete(reactor: Any, client: S3Client) -> None:
    """An object put with a type and metadata comes back whole and described,
    and is gone after delete (head None, get_bytes None, get S3Error 404)."""
    data = os.urandom(100_000)
    meta = {"digest": "sha256:" + hashlib.sha256(data).hexdigest(), "info": pack_meta({"é": 1})}
    assert call(reactor, client.put_bytes, "a/b c~d", data, "application/x-test", meta) is True
    info = call(reactor, client.head, "a/b c~d")
    assert info.size == len(data)
    assert info.content_type == "application/x-test"
    assert info.metadata == meta
    assert unpack_meta(info.metadata["info"]) == {"é": 1}
    assert info.etag == hashlib.md5(data).hexdigest()
    assert info.last_modified
    assert call(reactor, get_all, client, "a/b c~d") == (200, data)
    assert call(reactor, client.get_bytes, "a/b c~d", len(data)) == data
    with pytest.raises(S3Error) as e:
        call(reactor, client.get_bytes, "a/b c~d", len(data) - 1)
    assert e.value.s3_code == "BodyTooLarge"
    call(reactor, client.delete, "a/b c~d")
    call(reactor, client.delete, "a/b c~d")  # absent: no error
    assert call(reactor, client.head, "a/b c~d") is None
    assert call(reactor, client.get_bytes, "a/b c~d", 10) is None
    with pytest.raises(S3Error) as e:
        call(reactor, client.get, "a/b c~d")
    assert (e.value.code, e.value.s3_code) == (404, "NoSuchKey")
    assert client.breaker.state == "closed"


def test_range_get(reactor: Any, client: S3Client) -> None:
    """A range is 206 with exactly those bytes; an open-ended one runs to the
    end; one past the end is S3Error 416."""
    data = bytes(range(256)) * 40
    call(reactor, client.put_bytes, "r", data, "application/octet-stream", {})
    assert call(reactor, get_all, client, "r", 10, 19) == (206, data[10:20])
    assert call(reactor, get_all, client, "r", 10000) == (206, data[10000:])
    with pytest.raises(S3Error) as e:
        call(reactor, client.get, "r", len(data) + 5)
    assert e.value.code == 416


def test_if_none_match(reactor: Any, client: S3Client) -> None:
    """With if_none_match the first put wins and a second is refused (False),
    leaving the first object in place."""
    assert call(reactor, client.put_bytes, "lock", b"one", "text/plain", {}, True) is True
    assert call(reactor, client.put_bytes, "lock", b"two", "text/plain", {}, True) is False
    assert call(reactor, client.get_bytes, "lock", 10) == b"one"


def test_list_pages_and_prefix(reactor: Any, rgw: Any, client: S3Client) -> None:
    """A listing follows continuation tokens, stops at its limit, stays under
    the client's prefix and gives keys without it."""
    keys = [f"l/{i:02d}" for i in range(7)]
    for key in keys:
        call(reactor, client.put_bytes, key, key.encode(), "text/plain", {})
    call(reactor, client.put_bytes, "other", b"x", "text/plain", {})
    neighbour = make_client(reactor, rgw, bucket=client.bucket, prefix="else/")
    call(reactor, neighbour.put_bytes, "l/99", b"x", "text/plain", {})
    client.page_size = 2
    listed = call(reactor, client.list, "l/")
    assert [k for k, _, _ in listed] == keys
    assert all(size == 4 and modified for _, size, modified in listed)
    assert [k for k, _, _ in call(reactor, client.list, "l/", 3)] == keys[:3]
    assert [k for k, _, _ in call(reactor, client.list, "", 100)] == [*keys, "other"]
    assert call(reactor, client.list, "nothing/") == []
    call(reactor, neighbour.close)


def test_multipart_upload_of_a_file(reactor: Any, client: S3Client, tmp_path: Path) -> None:
    """A 40 MiB file goes up in three 16 MiB parts and comes back with the same digest."""
    path = tmp_path / "blob"
    size = 40 * MIB + 12345
    with open(path, "wb") as f:
        for _ in range(40):
            f.write(os.urandom(MIB))
        f.write(os.urandom(12345))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    meta = {"digest": digest}
    call(reactor, client.upload_file, "blobs/x", str(path), size, "application/octet-stream", meta)
    info = call(reactor, client.head, "blobs/x")
    assert (info.size, info.metadata, info.etag.endswith("-3")) == (size, meta, True)
    status, body = call(reactor, get_all, client, "blobs/x")
    assert status == 200 and len(body) == size
    assert hashlib.sha256(body).hexdigest() == digest
    assert call(reactor, client.list_uploads) == []


def test_upload_memory_is_two_parts(reactor: Any, client: S3Client, tmp_path: Path) -> None:
    """A multipart upload holds at most two parts in memory: the one being sent
    and the one read ahead (no copy of a whole part in the transport)."""
    path = tmp_path / "blob"
    with open(path, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(MIB))
    part = 8 * MIB
    tracemalloc.start()
    try:
        call(reactor, client.upload_file, "blobs/m", str(path), 64 * MIB, "x/y", {}, part)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Two parts, the slices on their way, and a 1 MiB read buffer per
    # connection (the client reads responses as the upstream side does).
    assert peak < 2 * part + 6 * MIB, f"peak {peak / MIB:.1f} MiB for {part // MIB} MiB parts"
    assert call(reactor, client.head, "blobs/m").size == 64 * MIB


def test_small_file_is_one_put(reactor: Any, client: S3Client, tmp_path: Path) -> None:
    """A file smaller than a part goes up in one PUT (no multipart upload)."""
    path = tmp_path / "small"
    path.write_bytes(b"small file")
    before = client.requests
    call(reactor, client.upload_file, "small", str(path), 10, "text/plain", {})
    assert client.requests == before + 1
    assert call(reactor, client.get_bytes, "small", 100) == b"small file"


def test_failed_upload_is_aborted(reactor: Any, client: S3Client, tmp_path: Path) -> None:
    """An upload that fails midway (the file is shorter than said) raises, and
    leaves neither a visible object nor an unfinished upload."""
    path = tmp_path / "short"
    with open(path, "wb") as f:
        for _ in range(20):
            f.write(os.urandom(MIB))
    with pytest.raises(OSError, match="ended at"):
        call(reactor, client.upload_file, "blobs/short", str(path), 40 * MIB, "x/y", {})
    assert call(reactor, client.head, "blobs/short") is None
    assert call(reactor, client.list, "blobs/") == []
    assert call(reactor, client.list_uploads) == []


def test_cancelled_upload_is_aborted(reactor: Any, client: S3Client, tmp_path: Path) -> None:
    """An upload its caller cancels midway is aborted: no object, no upload left."""
    path = tmp_path / "blob"
    with open(path, "wb") as f:
        for _ in range(48):
            f.write(os.urandom(MIB))
    started: list[Deferred[None]] = []
    before = client.requests

    def start() -> None:
        started.append(client.upload_file("blobs/c", str(path), 48 * MIB, "x/y", {}))

    call(reactor, start)
    deadline = time.monotonic() + WAIT
    while client.requests < before + 2:  # created, and the first part sent
        assert time.monotonic() < deadline, "the upload did not start"
        time.sleep(0.005)
    call(reactor, started[0].cancel)
    with pytest.raises(CancelledError):
        call(reactor, lambda: started[0])
    for _ in range(100):  # the abort runs on after the cancel
        if call(reactor, client.list_uploads) == []:
            break
        time.sleep(0.05)
    assert call(reactor, client.list_uploads) == []
    assert call(reactor, client.head, "blobs/c") is None


def test_abort_stale_uploads(reactor: Any, client: S3Client) -> None:
    """Unfinished uploads are listed, and aborted only once older than asked."""
    create = lambda: client._guarded("CREATE-UPLOAD", "k", lambda: client._create("k", {}))  # noqa: E731
    upload_id = call(reactor, create)
    uploads = call(reactor, client.list_uploads)
    assert [(k, u) for k, u, _ in uploads] == [("k", upload_id)]
    assert call(reactor, client.abort_stale_uploads, 3600) == 0
    time.sleep(1.5)
    assert call(reactor, client.abort_stale_uploads, 1.0) == 1
    assert call(reactor, client.list_uploads) == []


def test_presigned_get_and_its_expiry(reactor: Any, client: S3Client) -> None:
    """A presigned URL serves the object to a plain HTTP client; once expired
    the server refuses it (403)."""
    call(reactor, client.put_bytes, "p q/r+s", b"presigned bytes", "text/plain", {})
    with urllib.request.urlopen(client.presign_get("p q/r+s", 60), timeout=10) as response:
        assert response.read() == b"presigned bytes"
    url = client.presign_get("p q/r+s", 1)
    time.sleep(2)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=10)
    assert e.value.code == 403


def test_ensure_bucket(reactor: Any, rgw: Any) -> None:
    """ensure_bucket creates a missing bucket and accepts one that exists."""
    name = f"ensure-{os.getpid()}-{time.monotonic_ns()}"
    c = make_client(reactor, rgw, bucket=name)
    call(reactor, c.ensure_bucket)
    call(reactor, c.ensure_bucket)
    call(reactor, c.put_bytes, "k", b"v", "text/plain", {})
    assert call(reactor, c.get_bytes, "k", 10) == b"v"
    call(reactor, c.close)


def test_tls_with_a_private_ca(reactor: Any, rgw: Any) -> None:
    """Over HTTPS the client trusts the CA it is given."""
    if rgw.tls_endpoint is None:
        pytest.skip("this RGW has no HTTPS endpoint")
    c = make_client(reactor, rgw, endpoint=rgw.tls_endpoint, tls_ca=str(rgw.ca))
    call(reactor, c.put_bytes, "tls", b"over tls", "text/plain", {})
    assert call(reactor, get_all, c, "tls") == (200, b"over tls")
    call(reactor, c.close)


def test_frozen_osd_deadline_then_breaker(reactor: Any, rgw: Any) -> None:
    """With the OSD frozen, each call fails S3Unavailable at its 2 s deadline;
    after three the breaker is open and the next call fails at once with no
    request sent; after thawing and the reset period a trial closes it."""
    breaker = Breaker(reactor, failures=3, reset_after=3.0)
    c = make_client(reactor, rgw, deadline=2.0, breaker=breaker)
    call(reactor, c.put_bytes, "k", b"v", "text/plain", {})
    rgw.freeze_osd()
    try:
        for _ in range(3):
            began = time.monotonic()
            with pytest.raises(S3Unavailable):
                call(reactor, c.get_bytes, "k", 10)
            assert 1.9 <= time.monotonic() - began < 4
        assert breaker.state == "open"
        sent = c.requests
        began = time.monotonic()
        with pytest.raises(S3Unavailable, match="breaker open"):
            call(reactor, c.head, "k")
        assert time.monotonic() - began < 0.5
        assert c.requests == sent, "an open breaker sent a request"
    finally:
        rgw.thaw_osd()
    time.sleep(3.1)
    assert breaker.state == "half-open"
    # RGW may take a moment to recover: bounded retries of the trial.
    for _ in range(10):
        try:
            assert call(reactor, c.get_bytes, "k", 10) == b"v"
            break
        except S3Unavailable:
            time.sleep(3.1)
    assert breaker.state == "closed"
    call(reactor, c.close)


class _Canned(Resource):
    """Answers every request with one status and S3 error body, and keeps
    the request headers it saw."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.status = 503
        self.code = b"SlowDown"
        self.seen: list[dict[bytes, list[bytes]]] = []

    def render(self, request: Any) -> bytes:
        self.seen.append(dict(request.requestHeaders.getAllRawHeaders()))
        request.setResponseCode(self.status)
        return b"<Error><Code>" + self.code + b"</Code><Message>m</Message></Error>"


def test_server_errors_and_refusals(reactor: Any) -> None:
    """5xx answers and refused connections are S3Unavailable and count against
    the breaker; a 4xx is S3Error with S3's code and counts as an answer; the
    client never asks for a content encoding."""
    resource = _Canned()
    port = call(reactor, lambda: reactor.listenTCP(0, Site(resource), interface="127.0.0.1"))
    try:
        endpoint = f"http://127.0.0.1:{port.getHost().port}"
        breaker = Breaker(reactor, failures=2)
        c = S3Client(reactor, endpoint, "b", "us-east-1", "AK", "SK", breaker=breaker)
        with pytest.raises(S3Unavailable, match="503 SlowDown"):
            call(reactor, c.get, "k")
        assert breaker.consecutive_failures == 1
        resource.status, resource.code = 403, b"AccessDenied"
        with pytest.raises(S3Error) as e:
            call(reactor, c.get_bytes, "k", 10)
        assert (e.value.code, e.value.s3_code) == (403, "AccessDenied")
        assert breaker.consecutive_failures == 0
        encodings = [h.get(b"Accept-Encoding", [b""])[0] for h in resource.seen]
        assert encodings == [b"identity", b"identity"]
        call(reactor, c.close)
    finally:
        call(reactor, port.stopListening)
    refused = S3Client(reactor, endpoint, "b", "us-east-1", "AK", "SK", breaker=breaker)
    with pytest.raises(S3Unavailable):
        call(reactor, refused.head, "k")
    assert breaker.consecutive_failures == 1
