"""The shared store's S3 backend (``mirrord.store.bucket``) on a real S3
(a one-node Ceph RGW) with the fleet's index on a real redis-server:
verified blobs uploaded once and read back, tag records, the cap kept by
last access with pins held, and the index reconciled with the bucket."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import deferLater

from mirrord.fleet.index import FleetIndex
from mirrord.fleet.redis import FleetRedis
from mirrord.store.bucket import Bucket, blob_key
from mirrord.store.disk import Meta, TagRecord
from mirrord.store.s3 import S3Client
from mirrord.store.s3.client import read_body
from tests.support.reactorthread import call
from tests.support.redisserver import RedisServer, redis_server

__all__ = ["redis_server"]  # the fixture, used by name

SIZE = 300_000


@pytest.fixture
def parts(reactor: Any, rgw: Any, redis_server: RedisServer, tmp_path: Path) -> Iterator[Any]:
    """A bucket of its own, an index under a prefix of its own; files of
    random blobs in ``tmp_path``."""
    name = rgw.bucket()
    client = S3Client(
        reactor, rgw.endpoint, name, rgw.region, rgw.access_key, rgw.secret_key, deadline=10
    )
    redis = FleetRedis(reactor, redis_server.url, deadline=2.0)
    call(reactor, redis.start)
    index = FleetIndex(redis, prefix=f"t{uuid.uuid4().hex[:8]}:")
    yield reactor, client, index, tmp_path
    call(reactor, client.close)
    call(reactor, redis.stop)


def _blob(directory: Path) -> tuple[str, Path]:
    data = os.urandom(SIZE)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = directory / digest.split(":")[1]
    path.write_bytes(data)
    return digest, path


def _run(reactor: Any, coroutine: Any) -> Any:
    """A coroutine, run on the reactor thread (it does nothing until then;
    a Deferred-returning call must go through ``call`` instead)."""
    return call(reactor, lambda: ensureDeferred(coroutine))


META = Meta("application/octet-stream", "team/app", False, "docker.io")


def test_a_verified_blob_is_uploaded_once_and_read_back(parts) -> None:
    """``publish`` uploads the file with its Meta; ``lookup`` and ``open``
    give them back; publishing it again uploads nothing."""
    reactor, client, index, tmp = parts
    bucket = Bucket(client, reactor, index)
    digest, path = _blob(tmp)
    assert _run(reactor, bucket.lookup(digest)) is None
    assert _run(reactor, bucket.publish(digest, str(path), SIZE, META)) is True
    found = _run(reactor, bucket.lookup(digest))
    assert (found.size, found.meta) == (SIZE, META)
    response = _run(reactor, bucket.open(digest, 1000))
    assert response.code == 206
    body = call(reactor, read_body, response, SIZE)
    assert body == path.read_bytes()[1000:]
    assert _run(reactor, bucket.publish(digest, str(path), SIZE, META)) is False
    assert bucket.uploads == 1
    assert _run(reactor, index.total()) == SIZE


def test_tag_records_round_trip(parts) -> None:
    reactor, client, index, _ = parts
    bucket = Bucket(client, reactor, index)
    record = TagRecord(
        "sha256:" + "b" * 64, "application/vnd.oci.image.index.v1+json", 9, 1.5, True
    )
    assert _run(reactor, bucket.get_tag("docker.io", "library/alpine", "3")) is None
    _run(reactor, bucket.put_tag("docker.io", "library/alpine", "3", record))
    assert _run(reactor, bucket.get_tag("docker.io", "library/alpine", "3")) == record


def test_cap_evicts_the_least_recently_read_and_keeps_pins(parts) -> None:
    """Four blobs under a cap of three: the one read least recently goes,
    not a pinned one even when it is older, and not one read just now."""
    reactor, client, index, tmp = parts
    bucket = Bucket(client, reactor, index, max_size=3 * SIZE, pinned=("pinned/*",))
    blobs = [_blob(tmp) for _ in range(4)]
    pinned = Meta("application/octet-stream", "pinned/base", True, "docker.io")
    _run(reactor, bucket.publish(*blobs[0], SIZE, pinned))
    _run(reactor, bucket.publish(*blobs[1], SIZE, META))
    _run(reactor, bucket.publish(*blobs[2], SIZE, META))
    _run(reactor, bucket.open(blobs[1][0]))  # read: blob 2 is now the oldest unpinned

    def order() -> list[str]:
        return [digest for digest, _, _ in _run(reactor, index.oldest(4))]

    # The read reaches the index apart from the read itself.
    for _ in range(50):
        if order().index(blobs[2][0]) < order().index(blobs[1][0]):
            break
        call(reactor, deferLater, reactor, 0.1, lambda: None)
    _run(reactor, bucket.publish(*blobs[3], SIZE, META))

    def present() -> list[bool]:
        return [call(reactor, client.head, blob_key(d)) is not None for d, _ in blobs]

    # The eviction runs apart from the upload that went over the cap.
    for _ in range(50):
        if present() == [True, True, False, True]:
            break
        call(reactor, deferLater, reactor, 0.1, lambda: None)
    assert present() == [True, True, False, True]
    assert _run(reactor, index.total()) == 3 * SIZE


def test_reconcile_counts_what_the_bucket_holds(parts) -> None:
    """An upload whose indexing was lost (a host died in between) is
    counted again after a reconcile, and an entry whose object is gone is
    dropped."""
    reactor, client, index, tmp = parts
    bucket = Bucket(client, reactor, index)
    kept, gone = _blob(tmp), _blob(tmp)
    _run(reactor, bucket.publish(*kept, SIZE, META))
    _run(reactor, bucket.publish(*gone, SIZE, META))
    _run(reactor, index.remove(kept[0]))  # the index lost it
    call(reactor, client.delete, blob_key(gone[0]))  # the object went by hand
    assert _run(reactor, index.total()) == SIZE
    _run(reactor, bucket.reconcile())
    assert _run(reactor, index.total()) == SIZE
    assert _run(reactor, index.size(kept[0])) == SIZE
    assert _run(reactor, index.size(gone[0])) is None


def test_uploads_wait_their_turn(parts) -> None:
    """Blobs verified at once are uploaded a few at a time (memory and the
    disk worker are bounded), and every one arrives."""
    reactor, client, index, tmp = parts
    bucket = Bucket(client, reactor, index, uploads_at_once=1)
    blobs = [_blob(tmp) for _ in range(3)]

    def all_at_once() -> Any:
        return gatherResults(
            [ensureDeferred(bucket.publish(d, str(path), SIZE, META)) for d, path in blobs]
        )

    assert call(reactor, all_at_once) == [True, True, True]
    assert bucket.peak_uploads == 1
    assert _run(reactor, index.total()) == 3 * SIZE


def test_tag_pins_are_each_host_s_and_lapse_when_no_host_says_them(parts) -> None:
    """The fleet pins what any host says its pinned tags need; when a host
    stops saying a digest (its tag moved, its pattern removed) and no other
    host says it, it can be evicted again once that host's word expires."""
    reactor, client, index, _ = parts
    a = Bucket(client, reactor, index, host="a")
    b = Bucket(client, reactor, index, host="b")
    one, two = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    _run(reactor, a.pin_tags({one}))
    _run(reactor, b.pin_tags({two}))
    assert _run(reactor, index.pinned()) == {one, two}
    _run(reactor, a.pin_tags(set()))  # a's tag moved: it no longer pins one
    assert _run(reactor, index.pinned()) == {two}
    # b says its pins with a short life, then goes quiet: two lapses.
    _run(reactor, index.host_pins("b", {two}, 0.3))
    call(reactor, deferLater, reactor, 0.5, lambda: None)
    _run(reactor, a.pin_tags(set()))
    assert _run(reactor, index.pinned()) == set()
