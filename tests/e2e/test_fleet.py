"""A fleet: ``twistd mirrord`` members, each with its own state directory
and port, sharing one bucket on a real Ceph RADOS Gateway and one
``redis-server``, in front of the fake Hub. A blob is fetched from
upstream once for the fleet; what one member cached another serves without
the upstream; a member killed mid-fill leaves the others' clients whole or
cleanly cut; a frozen S3 or a stopped Redis keeps pulls working; a tag one
member fetched is served stale by another during an outage; skopeo pulls
through two members."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import Hub, Mirror, Skopeo, start_mirror, verify_dir_copy
from tests.e2e.test_shared_cache import (
    BIG,
    HOLD,
    SMALL,
    Fetched,
    _fetch,
    _held_pulls,
    _in_parallel,
    _join,
    _manifest,
    _wait_for,
    shared_hub,
)
from tests.support.pki import Pki
from tests.support.processes import free_port
from tests.support.redisserver import RedisServer, start_redis
from tests.support.rgw import Rgw

__all__ = ["shared_hub"]  # the fixture (the fake Hub these tests pull from), used by name


@dataclass
class FleetEnv:
    rgw: Rgw
    redis: RedisServer
    secrets: Path


@pytest.fixture(scope="module")
def fleet_env(workdir: Path, rgw: Rgw) -> Iterator[FleetEnv]:
    directory = workdir / "fleet"
    directory.mkdir(exist_ok=True)
    (directory / "s3-secret").write_text(rgw.secret_key + "\n")
    (directory / "fleet-secret").write_text(os.urandom(24).hex() + "\n")
    redis = start_redis(directory / "redis")
    yield FleetEnv(rgw, redis, directory)
    redis.stop()


_databases = iter(range(1, 16))


def _members(
    workdir: Path,
    pki: Pki,
    env: FleetEnv,
    hub: Hub,
    name: str,
    count: int = 2,
    extra: str = "",
    redis_url: str | None = None,
    store: str = "",
    workers: int = 1,
) -> list[Mirror]:
    """``count`` members on a fresh bucket and a Redis database of their own."""
    bucket = f"fleet-{name}"
    env.rgw.bucket(bucket)
    db = next(_databases)
    redis = redis_url or f"redis://127.0.0.1:{env.redis.port}/{db}"
    members = []
    for i in range(count):
        port = free_port()
        config = f"""
[store]
backend = "s3"
endpoint = "{env.rgw.endpoint}"
bucket = "{bucket}"
region = "{env.rgw.region}"
access_key = "{env.rgw.access_key}"
secret_key_file = "{env.secrets / "s3-secret"}"
deadline = 3
breaker_reset = 5
{store}
[fleet]
redis = "{redis}"
advertise = "https://127.0.0.1:{port}"
secret_file = "{env.secrets / "fleet-secret"}"
tls_ca = "{pki.ca}"
member = "{name}-{i}"
lease_ttl = 6
{extra}
"""
        members.append(
            start_mirror(
                workdir,
                pki,
                [hub.url],
                f"fleet-{name}-{i}",
                "--workers",
                str(workers),
                config=config,
                port=port,
            )
        )
    return members


def _config_of(workdir: Path, name: str) -> str:
    return (workdir / f"fleet-{name}-0.toml").read_text()


def _has(env: FleetEnv, bucket: str, key: str) -> bool:
    return env.rgw.request("HEAD", f"/{bucket}/{key}").status == 200


def _in_bucket(env: FleetEnv, bucket: str, digest: str) -> bool:
    return _has(env, bucket, "blobs/sha256/" + digest.split(":", 1)[1])


def _stop(members: list[Mirror]) -> None:
    """Stop each member as systemd would (SIGTERM): it exits 0, at once
    when idle (a member another streamed from included), never killed."""
    codes = {}
    for member in members:
        started = time.monotonic()
        codes[member.name] = (member.stop(timeout=20), round(time.monotonic() - started, 1))
    for name, (code, took) in codes.items():
        assert code == 0, f"{name} exited {code} after {took}s"


def _gets(hub: Hub) -> int:
    return hub.control()["counts"].get("GET blobs", 0)


def test_sixteen_clients_over_two_members_make_one_upstream_fetch(
    workdir: Path, pki: Pki, fleet_env: FleetEnv, shared_hub
) -> None:
    """16 concurrent clients of one uncached blob, 8 on each member, all get
    the right bytes from one upstream GET; the blob then sits in the bucket."""
    hub, big, _ = shared_hub
    context = ssl.create_default_context(cafile=str(pki.ca))
    members = _members(workdir, pki, fleet_env, hub, "sixteen")
    try:
        results, before, after = _held_pulls(
            hub,
            [lambda m=members[i % 2]: _fetch(context, m.port, big.digest, BIG) for i in range(16)],
        )
        _wait_for(lambda: _in_bucket(fleet_env, "fleet-sixteen", big.digest), timeout=30)
    finally:
        _stop(members)
    for result in results:
        assert isinstance(result, Fetched), result
        assert result.status.startswith(b"HTTP/1.1 200"), result.status
        assert result.complete and result.body == big.data
    assert after.get("GET blobs", 0) - before.get("GET blobs", 0) == 1
    assert after.get("cdn GET", 0) - before.get("cdn GET", 0) == 1
    logs = members[0].output() + members[1].output()
    assert "cache=FLEET" in logs


def test_members_with_two_workers_each_make_one_upstream_fetch(
    workdir: Path, pki: Pki, fleet_env: FleetEnv, shared_hub
) -> None:
    """Two members of two workers each (the lease names a host's process,
    the connection from another member reaches any of its workers): 16
    clients of one uncached blob still make one upstream GET, all whole."""
    hub, _, smalls = shared_hub
    blob = smalls[2]
    context = ssl.create_default_context(cafile=str(pki.ca))
    members = _members(workdir, pki, fleet_env, hub, "workers", workers=2)
    try:
        results, before, after = _held_pulls(
            hub,
            [
                lambda m=members[i % 2]: _fetch(context, m.port, blob.digest, SMALL)
                for i in range(16)
            ],
        )
    finally:
        _stop(members)
    for result in results:
        assert isinstance(result, Fetched), result
        assert result.complete and result.body == blob.data
    assert after.get("GET blobs", 0) - before.get("GET blobs", 0) == 1
    assert "cache=FLEET" in members[0].output() + members[1].output()


def test_what_one_member_cached_another_serves_without_upstream(
    workdir: Path, pki: Pki, fleet_env: FleetEnv, shared_hub
) -> None:
    """A blob pulled through member A is served by member B, which never
    had it, from the bucket: no upstream blob request."""
    hub, _, smalls = shared_hub
    blob = smalls[0]
    context = ssl.create_default_context(cafile=str(pki.ca))
    a, b = _members(workdir, pki, fleet_env, hub, "shared")
    try:
        first = _fetch(context, a.port, blob.digest, SMALL)
        _wait_for(lambda: _in_bucket(fleet_env, "fleet-shared", blob.digest), timeout=30)
        before = _gets(hub)
        second = _fetch(context, b.port, blob.digest, SMALL)
        after = _gets(hub)
    finally:
        _stop([a, b])
    assert first.complete and first.body == blob.data
    assert second.complete and second.body == blob.data
    assert after == before
    assert "cache=SHARED" in b.output()


def test_member_killed_mid_fill_leaves_whole_blobs_or_clean_cuts(
    workdir: Path, pki: Pki, fleet_env: FleetEnv, shared_hub
) -> None:
    """SIGKILL the member filling a blob while another member's clients
    stream it from that fill: the survivor takes over from the upstream
    with Range at the byte it had, so its clients end with the whole
    verified blob; the next pull through it is a whole blob too, and the
    bucket holds nothing but the right bytes."""
    hub, big, _ = shared_hub
    context = ssl.create_default_context(cafile=str(pki.ca))
    filler, survivor = _members(
        workdir, pki, fleet_env, hub, "killed", extra="[timeouts]\nbody_idle = 20\n"
    )
    before = hub.control(cdn_hold_at=HOLD)["counts"]
    try:
        first = _in_parallel([lambda: _fetch(context, filler.port, big.digest, BIG)])
        _wait_for(lambda: hub.control()["counts"].get("cdn GET", 0) > before.get("cdn GET", 0))
        followers = _in_parallel(
            [lambda: _fetch(context, survivor.port, big.digest, BIG) for _ in range(4)]
        )
        time.sleep(2)  # following the held fill over the fleet endpoint
        os.kill(filler.pid, signal.SIGKILL)
        filler.proc.wait(10)
        hub.control(cdn_hold_at=None, release_cdn=True)
        ended = _join(followers, timeout=60)
        _join(first, timeout=30)
        after = hub.control()["counts"]
        again = _fetch(context, survivor.port, big.digest, BIG)
        _wait_for(lambda: _in_bucket(fleet_env, "fleet-killed", big.digest), timeout=30)
        stored = fleet_env.rgw.request(
            "GET", "/fleet-killed/blobs/sha256/" + big.digest.split(":")[1], timeout=60
        ).body
    finally:
        hub.control(cdn_hold_at=None, release_cdn=True)
        filler.stop()  # killed above
        _stop([survivor])
    for result in ended:
        assert isinstance(result, Fetched), result
        assert result.complete and result.body == big.data
    assert again.complete and again.body == big.data
    assert hashlib.sha256(stored).hexdigest() == big.digest.split(":")[1]
    assert "cache=FLEET" in survivor.output()
    assert "took over" in survivor.output()
    # The survivor fetched only the rest, with Range, not the whole again.
    assert after.get("cdn ranged", 0) - before.get("cdn ranged", 0) >= 1


def test_frozen_s3_keeps_pulls_working(
    workdir: Path, pki: Pki, fleet_env: FleetEnv, shared_hub
) -> None:
    """With the OSD frozen (S3 hangs, as a stuck backend does), a pull
    through a member still completes from the upstream, within the S3
    deadline, and the member's breaker then skips S3."""
    hub, _, smalls = shared_hub
    blob = smalls[1]
    context = ssl.create_default_context(cafile=str(pki.ca))
    [member] = _members(workdir, pki, fleet_env, hub, "frozen", count=1)
    fleet_env.rgw.freeze_osd()
    try:
        started = time.monotonic()
        got = _fetch(context, member.port, blob.digest, SMALL)
        took = time.monotonic() - started
        again = _fetch(context, member.port, blob.digest, SMALL)
    finally:
        fleet_env.rgw.thaw_osd()
        member.stop()
    assert got.complete and got.body == blob.data
    assert again.complete and again.body == blob.data
    assert took < 20, f"the pull waited {took:.1f} s on a frozen S3"
    # S3 did hang (its deadline ended the wait), and nothing broke.
    assert "no answer within 3s" in member.output()
    assert "Traceback" not in member.output()


def test_stopped_redis_keeps_pulls_working(
    workdir: Path, pki: Pki, fleet_env: FleetEnv, shared_hub
) -> None:
    """With Redis gone, each member fills on its own: pulls through both
    complete with the right bytes."""
    hub, _, smalls = shared_hub
    blob = smalls[2]
    context = ssl.create_default_context(cafile=str(pki.ca))
    own = start_redis(fleet_env.secrets / "redis-stopped")
    members = _members(
        workdir, pki, fleet_env, hub, "noredis", redis_url=f"redis://127.0.0.1:{own.port}/0"
    )
    try:
        own.stop()
        results = [_fetch(context, m.port, blob.digest, SMALL) for m in members]
    finally:
        _stop(members)
        own.stop()
    for result in results:
        assert result.complete and result.body == blob.data
    assert "Traceback" not in members[0].output() + members[1].output()


def test_tag_fetched_by_one_member_is_served_stale_by_another(
    workdir: Path, pki: Pki, fleet_env: FleetEnv, shared_hub
) -> None:
    """A tag pulled through member A is answered by member B, which never
    pulled it, from the bucket while the upstream is down (stale)."""
    hub, _, _ = shared_hub
    context = ssl.create_default_context(cafile=str(pki.ca))
    a, b = _members(workdir, pki, fleet_env, hub, "stale", extra="[cache]\ntag_ttl = 0\n")
    try:
        status, body, _ = _manifest(context, a.port)
        assert status == 200
        _wait_for(
            lambda: _has(fleet_env, "fleet-stale", "tags/docker.io/library/alpine/latest"),
            timeout=20,
        )
        hub.control(outage=True)
        try:
            status, stale, warning = _manifest(context, b.port)
        finally:
            hub.control(outage=False)
    finally:
        _stop([a, b])
    assert (status, stale) == (200, body)
    assert "Stale" in warning
    assert "cache=STALE" in b.output()


def test_skopeo_pulls_through_two_members(
    workdir: Path,
    pki: Pki,
    fleet_env: FleetEnv,
    shared_hub,
    skopeo: Skopeo,
) -> None:
    """skopeo copies an image through member A, then through member B as
    docker.io's mirror; B's copy takes no blob from the upstream."""
    hub, _, _ = shared_hub
    a, b = _members(workdir, pki, fleet_env, hub, "skopeo")
    try:
        first = workdir / "fleet-skopeo-a"
        skopeo.copy(f"{a.address}/library/alpine:latest", first)
        verify_dir_copy(first)
        digests = [
            layer["digest"] for layer in json.loads((first / "manifest.json").read_text())["layers"]
        ]
        for digest in digests:
            _wait_for(lambda d=digest: _in_bucket(fleet_env, "fleet-skopeo", d), timeout=30)
        before = _gets(hub)
        second = workdir / "fleet-skopeo-b"
        conf = skopeo.registries_conf(b.address)
        skopeo.copy("docker.io/library/alpine:latest", second, conf=conf)
        verify_dir_copy(second)
        after = _gets(hub)
    finally:
        _stop([a, b])
    assert after == before
    assert (first / "manifest.json").read_bytes() == (second / "manifest.json").read_bytes()


def _bucket_bytes(env: FleetEnv, bucket: str) -> int:
    listing = env.rgw.request("GET", f"/{bucket}?list-type=2&prefix=blobs/").body.decode()
    return sum(int(size) for size in re.findall(r"<Size>(\d+)</Size>", listing))


def test_bucket_cap_holds_for_the_fleet(
    workdir: Path, pki: Pki, fleet_env: FleetEnv, shared_hub
) -> None:
    """Blobs pulled alternately through two members into a bucket capped at
    20 MB: the bucket stays under the cap, least recently used out first,
    and the latest blob is kept."""
    hub, _, smalls = shared_hub
    context = ssl.create_default_context(cafile=str(pki.ca))
    members = _members(workdir, pki, fleet_env, hub, "cap", store='max_size = "20MB"\n')
    try:
        for i, blob in enumerate(smalls):
            got = _fetch(context, members[i % 2].port, blob.digest, SMALL)
            assert got.complete and got.body == blob.data
            _wait_for(lambda b=blob: _in_bucket(fleet_env, "fleet-cap", b.digest), timeout=30)
            _wait_for(lambda: _bucket_bytes(fleet_env, "fleet-cap") <= 20_000_000, timeout=10)
        # The eviction follows the upload that went over the cap.
        _wait_for(lambda: not _in_bucket(fleet_env, "fleet-cap", smalls[0].digest), timeout=10)
        assert _in_bucket(fleet_env, "fleet-cap", smalls[-1].digest)
        assert _bucket_bytes(fleet_env, "fleet-cap") <= 20_000_000
    finally:
        _stop(members)
    assert "evicted" in members[0].output() + members[1].output()


def test_redirect_sends_clients_to_a_presigned_url(
    workdir: Path, pki: Pki, fleet_env: FleetEnv, shared_hub
) -> None:
    """With ``redirect = true`` a member answers a blob only the bucket has
    with a 307 to a presigned URL that serves the right bytes, and a HEAD
    from the bucket's size, with no upstream request."""
    hub, _, smalls = shared_hub
    blob = smalls[3]
    context = ssl.create_default_context(cafile=str(pki.ca))
    a, b = _members(workdir, pki, fleet_env, hub, "redirect", store="redirect = true\n")
    try:
        first = _fetch(context, a.port, blob.digest, SMALL)
        _wait_for(lambda: _in_bucket(fleet_env, "fleet-redirect", blob.digest), timeout=30)
        before = _gets(hub)
        conn = http.client.HTTPSConnection("127.0.0.1", b.port, context=context, timeout=30)
        conn.request("HEAD", f"/v2/library/alpine/blobs/{blob.digest}")
        head = conn.getresponse()
        head.read()
        conn.request("GET", f"/v2/library/alpine/blobs/{blob.digest}")
        moved = conn.getresponse()
        moved.read()
        conn.close()
        location = moved.getheader("Location") or ""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        body = opener.open(location, timeout=30).read()
        after = _gets(hub)
    finally:
        _stop([a, b])
    assert first.complete and first.body == blob.data
    assert head.status == 200 and head.getheader("Content-Length") == str(SMALL)
    assert moved.status == 307
    assert location.startswith(fleet_env.rgw.endpoint) and "X-Amz-Signature=" in location
    assert body == blob.data
    assert after == before


def test_metrics_and_status_page_show_the_store_and_the_members(
    workdir: Path, pki: Pki, fleet_env: FleetEnv, shared_hub
) -> None:
    """``/metrics`` and the usage page of a member say S3 and Redis answer,
    how many members there are, and what the bucket holds."""
    hub, _, smalls = shared_hub
    context = ssl.create_default_context(cafile=str(pki.ca))
    a, b = _members(workdir, pki, fleet_env, hub, "ops")
    try:
        got = _fetch(context, a.port, smalls[1].digest, SMALL)
        _wait_for(lambda: _in_bucket(fleet_env, "fleet-ops", smalls[1].digest), timeout=30)

        def page(path: str) -> str:
            conn = http.client.HTTPSConnection("127.0.0.1", a.port, context=context, timeout=30)
            try:
                conn.request("GET", path, headers={"Accept-Language": "en"})
                return conn.getresponse().read().decode()
            finally:
                conn.close()

        def figures() -> dict[str, float]:
            return {
                name: float(value)
                for name, value in re.findall(
                    r"^(mirrord_(?:fleet|shared)\w*) (\S+)$", page("/metrics"), re.M
                )
            }

        # Status is polled every few seconds, never on the scrape.
        _wait_for(lambda: figures().get("mirrord_shared_store_blobs", 0) >= 1, timeout=20)
        metrics = figures()
        usage = page("/")
    finally:
        _stop([a, b])
    assert got.complete
    assert metrics["mirrord_shared_store_up"] == 1
    assert metrics["mirrord_fleet_redis_up"] == 1
    assert metrics["mirrord_fleet_members"] == 2
    assert metrics["mirrord_shared_store_size_bytes"] >= SMALL
    assert metrics["mirrord_shared_store_uploads"] == 1
    assert "Fleet" in usage and "ops-0" in usage and "ops-1" in usage


def test_a_dead_process_lease_on_this_host_does_not_stall_its_pulls(
    workdir: Path, pki: Pki, fleet_env: FleetEnv, shared_hub
) -> None:
    """A process of this host died holding a blob's lease (it has not
    expired yet): the next pull through the host fills the blob at once
    rather than following the host's own address."""
    hub, big, _ = shared_hub
    context = ssl.create_default_context(cafile=str(pki.ca))
    [member] = _members(workdir, pki, fleet_env, hub, "deadlease", count=1, extra="")
    db = re.search(
        r'redis = "redis://127.0.0.1:\d+/(\d+)"', _config_of(workdir, "deadlease")
    ).group(1)
    advertise = f"https://127.0.0.1:{member.port}"
    subprocess.run(
        [
            "redis-cli",
            "-p",
            str(fleet_env.redis.port),
            "-n",
            db,
            "SET",
            f"mirrord:lease:{big.digest}",
            f"{advertise}#deadprocess",
            "PX",
            "60000",
        ],
        check=True,
        capture_output=True,
        timeout=10,
    )
    try:
        started = time.monotonic()
        got = _fetch(context, member.port, big.digest, BIG)
        took = time.monotonic() - started
    finally:
        _stop([member])
    assert got.complete and got.body == big.data
    assert took < 10, f"the pull waited {took:.1f} s on its own host's stale lease"
    assert "this host's lease is a dead process's" in member.output()


def test_a_corrupt_object_in_the_bucket_is_deleted_and_the_next_pull_is_whole(
    workdir: Path, pki: Pki, fleet_env: FleetEnv, shared_hub
) -> None:
    """Bytes in the bucket that do not hash to their key's digest are never
    sent whole: the client is cut, the object deleted, and the next pull
    comes from the upstream, whole."""
    hub, _, smalls = shared_hub
    blob = smalls[3]
    context = ssl.create_default_context(cafile=str(pki.ca))
    [member] = _members(workdir, pki, fleet_env, hub, "corrupt", count=1)
    key = "blobs/sha256/" + blob.digest.split(":")[1]
    wrong = bytearray(blob.data)
    wrong[SMALL // 2] ^= 0xFF
    meta = '{"media_type":"application/octet-stream","repository":"library/alpine",'
    meta += '"public":true,"registry":"docker.io"}'
    put = fleet_env.rgw.request(
        "PUT", f"/fleet-corrupt/{key}", bytes(wrong), {"x-amz-meta-mirrord": meta}, timeout=30
    )
    assert put.status == 200
    try:
        first = _fetch(context, member.port, blob.digest, SMALL)
        _wait_for(lambda: not _has(fleet_env, "fleet-corrupt", key), timeout=20)
        second = _fetch(context, member.port, blob.digest, SMALL)
    finally:
        _stop([member])
    assert not first.complete
    assert blob.data[: SMALL // 2].startswith(first.body[: SMALL // 2])
    assert second.complete and second.body == blob.data
    assert "is corrupt: deleting it" in member.output()
