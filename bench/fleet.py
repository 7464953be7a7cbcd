"""The fleet's measures (issue 11): a blob served from the shared bucket
against the same blob from the member's own disk, and one cold blob under
2 x ``--concurrent`` clients spread over two members against all of them
on one member.

Members are ``twistd mirrord`` daemons started by the bench (same argv,
same nginx upstream and its access log, which counts the fetches) with
``[store] backend = "s3"`` and ``[fleet] redis``, as tests/e2e/test_fleet.py
configures them. One Ceph RGW (memstore: the bucket lives in RAM) and one
redis-server serve the whole run: RGW takes about 15 s to start. Every
measure starts its members on empty state directories and stops them by
PID before it returns; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tests.support.processes import free_port
from tests.support.redisserver import RedisServer, start_redis
from tests.support.rgw import Rgw

if TYPE_CHECKING:
    from bench.run import Bench, Daemon

MIB = 1 << 20
BLOBS = "/v2/library/bench/blobs/"
MEASURES = frozenset({"fleet hit", "fleet cold two", "fleet cold one"})
HIT_BUCKET = "bench-hit"
HIT_DB = 0  # the hit bucket's Redis database; cold measures take 1-15 in turn
UPLOAD_WAIT = 120.0  # for a filled blob to be in the bucket (s)

MEMBER = """
[store]
backend = "s3"
endpoint = "{endpoint}"
bucket = "{bucket}"
region = "{region}"
access_key = "{access_key}"
secret_key_file = "{secrets}/s3-secret"

[fleet]
redis = "redis://127.0.0.1:{redis_port}/{db}"
advertise = "https://127.0.0.1:{port}"
secret_file = "{secrets}/fleet-secret"
tls_ca = "{ca}"
member = "{name}"
"""


class FleetError(RuntimeError):
    """The fleet did not do what a measure relies on (the row is not counted)."""


@dataclass
class Fleet:
    """The run's RGW and Redis, and the members each measure starts."""

    bench: Bench
    rgw: Rgw
    redis: RedisServer
    secrets: Path
    started: int = 0
    _digest_hex: str = field(init=False)

    def __post_init__(self) -> None:
        self._digest_hex = self.bench.mid.split(":", 1)[1]

    @classmethod
    def start(cls, bench: Bench) -> Fleet:
        directory = bench.work / "fleet"
        directory.mkdir(exist_ok=True)
        rgw = Rgw.start(directory / "rgw")
        try:
            redis = start_redis(directory / "redis")
        except BaseException:
            rgw.stop()
            raise
        (directory / "s3-secret").write_text(rgw.secret_key + "\n")
        (directory / "fleet-secret").write_text(os.urandom(24).hex() + "\n")
        print(
            f"  started RGW in {rgw.start_seconds:.1f} s: pids {rgw.pids}; "
            f"redis-server: pid {redis.proc.pid if redis.proc else '?'}",
            flush=True,
        )
        return cls(bench, rgw, redis, directory)

    def stop(self) -> None:
        self.redis.stop()
        self.rgw.stop()

    # -- members ---------------------------------------------------------

    def member(self, bucket: str, db: int) -> Daemon:
        """A member on an empty state directory (nothing on its disk)."""
        self.started += 1
        name = f"fleet-{self.started}"
        port = free_port()
        config = MEMBER.format(
            endpoint=self.rgw.endpoint,
            bucket=bucket,
            region=self.rgw.region,
            access_key=self.rgw.access_key,
            secrets=self.secrets,
            redis_port=self.redis.port,
            db=db,
            port=port,
            ca=self.bench.pki.ca,
            name=name,
        )
        return self.bench.mirrord(name, config, port=port)

    def url(self, daemon: Daemon) -> str:
        return f"https://127.0.0.1:{daemon.port}{BLOBS}{self.bench.mid}"

    def seed(self) -> None:
        """Put the concurrent blob in the hit bucket by pulling it through
        a member whose state directory then goes: later members find it
        in the bucket only."""
        self.rgw.bucket(HIT_BUCKET)
        daemon = self.member(HIT_BUCKET, HIT_DB)
        try:
            self.bench.single(self.url(daemon), size=self._size)
            self._wait_in_bucket(HIT_BUCKET)
        finally:
            self.bench.finish_fresh(daemon)

    # -- measures --------------------------------------------------------

    def hit(self) -> dict[str, float]:
        """A member that never had the blob: its first GET streams it from
        the bucket (filling its disk as it goes), the second is a hit from
        its disk; speed and CPU per GiB of each."""
        daemon = self.member(HIT_BUCKET, HIT_DB)
        try:
            url = self.url(daemon)
            fetched = self.bench.upstream_fetches(self.bench.mid)
            shared = self.bench.single(url, daemon, self._size)
            self._wait_on_disk(daemon)
            local = self.bench.single(url, daemon, self._size)
            log = daemon.process.output()
            if self.bench.upstream_fetches(self.bench.mid) != fetched:
                raise FleetError("the S3 hit reached the upstream")
            if log.count("cache=SHARED") != 1 or log.count("cache=HIT") != 1:
                raise FleetError("expected one cache=SHARED then one cache=HIT in the member's log")
        finally:
            self.bench.finish_fresh(daemon)
        return {
            "speed": shared["speed"],
            "cpu": shared["cpu"],
            "local_speed": local["speed"],
            "local_cpu": local["cpu"],
        }

    def cold(self, members: int) -> dict[str, float]:
        """2 x ``--concurrent`` clients of a blob no member and no bucket
        has, spread evenly over ``members`` fresh members sharing a fresh
        bucket and Redis database: wall time, upstream fetches, and the
        largest member's peak RSS; and how long after the last byte the
        blob was in the bucket (``upload_wait``)."""
        self.started += 1
        bucket = self.rgw.bucket(f"bench-cold-{self.started}")
        db = 1 + self.started % 15
        _redis(self.redis.port, f"SELECT {db}", "FLUSHDB")
        daemons: list[Daemon] = []
        try:
            for _ in range(members):
                daemons.append(self.member(bucket, db))
            per_member = 2 * self.bench.args.concurrent // members
            figures = self.bench.clients([self.url(d) for d in daemons for _ in range(per_member)])
            figures["peak_rss"] = max(d.peak_rss_kib() for d in daemons) / 1024
            # Stopped before the upload ends, a member would leave a
            # multipart upload behind in RGW's memory.
            began = time.monotonic()
            try:
                self._wait_in_bucket(bucket)
            except FleetError as e:
                said = "; ".join(m for d in daemons for m in _messages(d, "warn", "error"))
                raise FleetError(f"{e}; the members warned: {said or 'nothing'}") from None
            figures["upload_wait"] = time.monotonic() - began
            return figures
        finally:
            for daemon in daemons:
                self._stop(daemon)
            self._drop(bucket)

    def _stop(self, daemon: Daemon) -> None:
        """Stop a member; one that takes long to go shows its log's tail."""
        began = time.monotonic()
        self.bench.finish_fresh(daemon)
        took = time.monotonic() - began
        if took > 5:
            tail = "".join(f"\n      {m}" for m in _messages(daemon)[-5:])
            print(f"    ! {daemon.process.name} took {took:.1f} s to stop; its log ends:{tail}")

    # -- the bucket --------------------------------------------------------

    @property
    def _size(self) -> int:
        return self.bench.args.concurrent_size_mib * MIB

    def _key(self, bucket: str) -> str:
        return f"/{bucket}/blobs/sha256/{self._digest_hex}"

    def _wait_in_bucket(self, bucket: str) -> None:
        deadline = time.monotonic() + UPLOAD_WAIT
        while time.monotonic() < deadline:
            if self.rgw.request("HEAD", self._key(bucket)).status == 200:
                return
            time.sleep(0.2)
        raise FleetError(f"the blob was not in {bucket} within {UPLOAD_WAIT:.0f} s")

    def _wait_on_disk(self, daemon: Daemon, timeout: float = 30.0) -> None:
        """Until the member has published the blob its S3 hit filled (the
        next GET is then a local hit, not a follower of that fill)."""
        data = daemon.state_dir / "cache" / "blobs" / "sha256"
        path = data / self._digest_hex[:2] / self._digest_hex / "data"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                return
            time.sleep(0.1)
        raise FleetError(f"{path} did not appear within {timeout:.0f} s")

    def _drop(self, bucket: str) -> None:
        """Delete the bucket and have RGW free its data now: memstore is
        2 GiB of RAM, and RGW's garbage collector would wait hours."""
        listing = self.rgw.request("GET", f"/{bucket}")
        if listing.status == 200:
            for key in ET.fromstring(listing.body).iter():
                if key.tag.endswith("}Key") and key.text:
                    self.rgw.request("DELETE", f"/{bucket}/{key.text}")
        self.rgw.request("DELETE", f"/{bucket}")
        conf = str(self.rgw.conf)
        subprocess.run(
            ["radosgw-admin", "-c", conf, "gc", "process", "--include-all"],
            capture_output=True,
            timeout=60,
            cwd=self.rgw.directory,
        )


def _messages(daemon: Daemon, *levels: str) -> list[str]:
    """The messages of a member's JSON log (of ``levels`` only, if given)."""
    found = []
    for line in daemon.process.output().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not levels or event.get("level") in levels:
            found.append(str(event.get("message", ""))[:200])
    return found


def _redis(port: int, *commands: str, timeout: float = 5.0) -> None:
    """Inline commands to Redis; each must answer ``+OK``."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall("".join(c + "\r\n" for c in commands).encode())
        answer = b""
        while answer.count(b"\r\n") < len(commands):
            chunk = s.recv(256)
            if not chunk:
                break
            answer += chunk
    if answer.split(b"\r\n")[: len(commands)] != [b"+OK"] * len(commands):
        raise FleetError(f"redis answered {answer!r} to {commands}")
