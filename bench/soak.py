"""Soak: a mixed, hostile load against ``twistd mirrord`` for a given time,
while its memory and open file descriptors are sampled.

The fake Docker Hub (``tests/support/fakehub.py``) runs as a process on
127.0.0.1 with generated images and two 32 MiB blobs; ``twistd mirrord``
runs in front of it with the test CA, mirror login on (``[access.users]``)
and a cache too small for both big blobs, so they keep being evicted and
fetched again (fills run all the time, not only in the first minute). A
bounded number of client threads then loop over, at random:

- full pulls as a client does them (``/v2/`` probe, Basic login to the
  mirror, ``/token``, manifest or index by tag, every manifest, config and
  layer), every body checked against its sha256;
- big-blob pulls (often a miss that starts or follows a fill), checked;
- HEADs of manifests and blobs (length and digest checked);
- clients that abort: mid-blob (with or without a TCP reset), right after
  sending the request, halfway through the request, or before TLS;
- clients that stall: read a little of a big blob, stop reading for a
  while, then read the rest (checked) or hang up;
- wrong passwords, on ``/v2/`` and ``/token``.

Every few seconds the daemon's ``VmRSS`` and ``/proc/PID/fd`` are sampled.
At the end a summary is printed; the exit status is non-zero if any body
failed its digest, any request got an answer it should not have, the
daemon logged a traceback, or RSS or descriptors grew beyond the stated
tolerance between the warm part of the run and its end.

Everything listens on 127.0.0.1; every process started here is stopped by
PID. Run: ``bench/soak --minutes 30``; in a loopback-only namespace:
``unshare -n sh -c 'ip link set lo up && bench/soak --minutes 2'``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from mirrord.passwords import make_hash  # noqa: E402
from tests.support import images  # noqa: E402
from tests.support.pki import make_pki  # noqa: E402
from tests.support.processes import Process, free_port, mirrord_argv  # noqa: E402

MIB = 1 << 20
USER, PASSWORD = "soak", "soak-password"
MANIFEST_TYPES = ", ".join(
    (
        images.OCI_INDEX,
        images.OCI_MANIFEST,
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)
# Relative weights of the actions in the mix.
MIX = {
    "pull": 25,
    "big pull": 8,
    "head": 25,
    "abort": 15,
    "stall": 7,
    "wrong password": 20,
}
# Growth allowed between the warm part of the run and its end.
RSS_TOLERANCE = (0.15, 8 * MIB)  # 15 % plus 8 MiB
FD_TOLERANCE = 8


class DigestMismatch(Exception):
    """A body whose sha256 is not the digest it was asked for."""


class Unexpected(Exception):
    """An answer a correct mirror would not give."""


@dataclass
class Image:
    name: str
    tag: str
    layout: images.Layout

    def manifest(self, digest: str) -> dict:
        return json.loads(self.layout.blobs[digest])


@dataclass
class World:
    port: int
    context: ssl.SSLContext
    images: list[Image]
    big: dict[str, int]  # digest -> size, served under library/alpine
    timeout: float
    stall_max: float


@dataclass
class Tally:
    """Counts per action, shared by the client threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    ok: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    digest_failures: int = 0
    verified_bytes: int = 0
    verified_blobs: int = 0
    examples: list[str] = field(default_factory=list)

    def record(self, action: str, error: BaseException | None) -> None:
        with self.lock:
            if error is None:
                self.ok[action] += 1
                return
            self.failed[action] += 1
            if isinstance(error, DigestMismatch):
                self.digest_failures += 1
            if len(self.examples) < 20:
                self.examples.append(f"{action}: {type(error).__name__}: {error}")

    def verified(self, size: int) -> None:
        with self.lock:
            self.verified_blobs += 1
            self.verified_bytes += size


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Client:
    """One simulated client, on its own thread, with its own random stream."""

    def __init__(self, world: World, tally: Tally, rng: random.Random, number: int = 0) -> None:
        self.world = world
        self.tally = tally
        self.rng = rng
        # Each client is its own address to the mirror (X-Forwarded-For from
        # a trusted proxy): the per-address limits on failed logins must
        # stop a guesser, not everyone behind the same loopback address.
        self.address = f"10.1.{number // 250}.{number % 250 + 1}"
        self._tokens: dict[str, tuple[str, float]] = {}

    # -- plumbing -------------------------------------------------------

    def connect(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            "127.0.0.1", self.world.port, context=self.world.context, timeout=self.world.timeout
        )

    def ask(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        conn.request(method, path, headers={"X-Forwarded-For": self.address, **(headers or {})})
        return conn.getresponse()

    def expect(self, response: http.client.HTTPResponse, *codes: int) -> None:
        if response.status not in codes:
            body = response.read(2048)
            raise Unexpected(f"{response.status} (wanted {codes}): {body[:300]!r}")

    def read_checked(self, response: http.client.HTTPResponse, digest: str) -> bytes | int:
        """The whole body, streamed through sha256; its bytes if small."""
        h = hashlib.sha256()
        size = 0
        small = []
        while chunk := response.read(MIB):
            h.update(chunk)
            size += len(chunk)
            if size <= 4 * MIB:
                small.append(chunk)
        if "sha256:" + h.hexdigest() != digest:
            raise DigestMismatch(f"{digest}: got sha256:{h.hexdigest()} over {size} bytes")
        self.tally.verified(size)
        return b"".join(small) if size <= 4 * MIB else size

    def token(self, conn: http.client.HTTPConnection, name: str, fresh: bool = False) -> str:
        """A client's login: the challenge on /v2/, then /token with Basic."""
        cached = self._tokens.get(name)
        if cached and not fresh and time.monotonic() - cached[1] < 200:
            return cached[0]
        response = self.ask(conn, "GET", "/v2/")
        self.expect(response, 401)
        response.read()
        if "basic" not in (response.getheader("www-authenticate") or "").lower():
            raise Unexpected("/v2/ without credentials did not ask for the mirror's login")
        response = self.ask(conn, "GET", "/v2/", {"Authorization": basic(USER, PASSWORD)})
        self.expect(response, 401)
        response.read()
        challenge = response.getheader("www-authenticate") or ""
        realm = re.search(r'realm="([^"]+)"', challenge)
        service = re.search(r'service="([^"]+)"', challenge)
        if not realm or not service or not realm.group(1).endswith("/token"):
            raise Unexpected(f"challenge not rewritten to the mirror: {challenge!r}")
        query = f"service={service.group(1)}&scope=repository:{name}:pull"
        response = self.ask(
            conn, "GET", f"/token?{query}", {"Authorization": basic(USER, PASSWORD)}
        )
        self.expect(response, 200)
        token = json.loads(response.read())["token"]
        self._tokens[name] = (token, time.monotonic())
        return token

    def blob_url(self, name: str, digest: str) -> str:
        return f"/v2/{name}/blobs/{digest}"

    # -- actions --------------------------------------------------------

    def pull(self) -> None:
        image = self.rng.choice(self.world.images)
        conn = self.connect()
        try:
            auth = {"Authorization": "Bearer " + self.token(conn, image.name, fresh=True)}
            response = self.ask(
                conn,
                "GET",
                f"/v2/{image.name}/manifests/{image.tag}",
                {**auth, "Accept": MANIFEST_TYPES},
            )
            self.expect(response, 200)
            want = image.layout.manifest_digest
            if response.getheader("docker-content-digest") != want:
                raise DigestMismatch(f"tag answered {response.getheader('docker-content-digest')}")
            self.read_checked(response, want)
            manifests = [want]
            top = image.manifest(want)
            if "manifests" in top:  # an index: pull every platform
                manifests = [m["digest"] for m in top["manifests"]]
                for digest in manifests:
                    response = self.ask(
                        conn,
                        "GET",
                        f"/v2/{image.name}/manifests/{digest}",
                        {**auth, "Accept": MANIFEST_TYPES},
                    )
                    self.expect(response, 200)
                    self.read_checked(response, digest)
            for digest in manifests:
                document = image.manifest(digest)
                for blob in [document["config"], *document["layers"]]:
                    response = self.ask(
                        conn, "GET", self.blob_url(image.name, blob["digest"]), auth
                    )
                    self.expect(response, 200)
                    self.read_checked(response, blob["digest"])
        finally:
            conn.close()

    def big_pull(self) -> None:
        digest = self.rng.choice(sorted(self.world.big))
        conn = self.connect()
        try:
            auth = {"Authorization": "Bearer " + self.token(conn, "library/alpine")}
            response = self.ask(conn, "GET", self.blob_url("library/alpine", digest), auth)
            self.expect(response, 200)
            self.read_checked(response, digest)
        finally:
            conn.close()

    def head(self) -> None:
        image = self.rng.choice(self.world.images)
        conn = self.connect()
        try:
            auth = {"Authorization": "Bearer " + self.token(conn, image.name)}
            if self.rng.random() < 0.5:
                want = image.layout.manifest_digest
                path = f"/v2/{image.name}/manifests/{image.tag}"
                headers = {**auth, "Accept": MANIFEST_TYPES}
            else:
                want = self.rng.choice(sorted(image.layout.blobs))
                path = self.blob_url(image.name, want)
                headers = auth
            response = self.ask(conn, "HEAD", path, headers)
            self.expect(response, 200)
            response.read()
            size = response.getheader("content-length")
            digest = response.getheader("docker-content-digest")
            if size != str(len(image.layout.blobs[want])) or digest not in (None, want):
                raise Unexpected(f"HEAD {path}: length {size} digest {digest}")
            if path.split("/")[-2] == "manifests" and digest != want:
                raise DigestMismatch(f"HEAD {path} answered {digest}")
        finally:
            conn.close()

    def abort(self) -> None:
        how = self.rng.choice(
            ("mid-blob", "mid-blob reset", "after request", "half request", "tcp")
        )
        if how == "tcp":
            with socket.create_connection(("127.0.0.1", self.world.port), timeout=5) as s:
                if self.rng.random() < 0.5:
                    s.sendall(b"GET /v2/ HTTP/1.1\r\n\r\n")  # not TLS at all
            return
        digest = self.rng.choice(sorted(self.world.big))
        conn = self.connect()
        try:
            auth = {"Authorization": "Bearer " + self.token(conn, "library/alpine")}
            path = self.blob_url("library/alpine", digest)
            if how == "half request":
                if conn.sock is None:
                    conn.connect()
                conn.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuth".encode())
                return
            conn.request("GET", path, headers=auth)
            if how == "after request":
                return
            response = conn.getresponse()
            self.expect(response, 200)
            left = self.rng.randrange(1, self.world.big[digest] // 2)
            while left > 0 and (chunk := response.read(min(left, MIB))):
                left -= len(chunk)
            if how == "mid-blob reset":
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            conn.close()

    def stall(self) -> None:
        digest = self.rng.choice(sorted(self.world.big))
        conn = self.connect()
        try:
            auth = {"Authorization": "Bearer " + self.token(conn, "library/alpine")}
            response = self.ask(conn, "GET", self.blob_url("library/alpine", digest), auth)
            self.expect(response, 200)
            h = hashlib.sha256()
            first = response.read(256 * 1024)
            h.update(first)
            time.sleep(self.rng.uniform(1, self.world.stall_max))
            if self.rng.random() < 0.3:
                return  # hang up after the stall
            size = len(first)
            while chunk := response.read(MIB):
                h.update(chunk)
                size += len(chunk)
            if "sha256:" + h.hexdigest() != digest:
                raise DigestMismatch(f"{digest} after a stall: sha256:{h.hexdigest()} ({size} B)")
            self.tally.verified(size)
        finally:
            conn.close()

    def wrong_password(self) -> None:
        user = USER if self.rng.random() < 0.7 else f"nobody{self.rng.randrange(1000)}"
        wrong = basic(user, f"guess-{self.rng.getrandbits(48):x}")
        path = (
            "/v2/"
            if self.rng.random() < 0.5
            else "/token?service=fakehub&scope=repository:library/alpine:pull"
        )
        conn = self.connect()
        try:
            # Guesses come from an address of their own, so the limit they
            # meet (429 after too many) does not stop this client's pulls.
            guesser = self.address.replace("10.1.", "10.66.", 1)
            response = self.ask(
                conn, "GET", path, {"Authorization": wrong, "X-Forwarded-For": guesser}
            )
            self.expect(response, 401, 429)
            body = json.loads(response.read())
            if body["errors"][0]["code"] not in ("UNAUTHORIZED", "TOOMANYREQUESTS"):
                raise Unexpected(f"wrong password on {path}: {body}")
        finally:
            conn.close()

    def actions(self) -> dict[str, Callable[[], None]]:
        return {
            "pull": self.pull,
            "big pull": self.big_pull,
            "head": self.head,
            "abort": self.abort,
            "stall": self.stall,
            "wrong password": self.wrong_password,
        }

    def run(self, deadline: float) -> None:
        actions = self.actions()
        names = list(MIX)
        weights = [MIX[n] for n in names]
        while time.monotonic() < deadline:
            action = self.rng.choices(names, weights)[0]
            try:
                actions[action]()
            except Exception as e:
                self.tally.record(action, e)
                self._tokens.clear()
            else:
                self.tally.record(action, None)


@dataclass
class Sample:
    at: float
    rss: int
    fds: int


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sample(pid: int, started: float) -> Sample:
    return Sample(time.monotonic() - started, rss_bytes(pid), open_fds(pid))


def make_big(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(size // MIB):
            chunk = os.urandom(MIB)
            digest.update(chunk)
            f.write(chunk)
    return "sha256:" + digest.hexdigest()


def start_hub(work: Path, layouts: dict[str, images.Layout], big: dict[str, Path]) -> Process:
    port, cdn = free_port(), free_port()
    argv = [sys.executable, "-m", "tests.support.fakehub", "--port", str(port)]
    argv += ["--cdn-port", str(cdn)]
    for name, layout in layouts.items():
        argv += ["--image", f"{name}={layout.path}:{layout.tag}"]
    for digest, path in big.items():
        argv += ["--blob", f"{digest}={path}"]
    return Process("fake hub", argv, port, work / "hub.log").start()


def start_mirror(work: Path, pki, hub_url: str, cache_size: str) -> Process:
    port = free_port()
    config = work / "mirrord.toml"
    config.write_text(
        f'listen = ["tcp:{port}:interface=127.0.0.1"]\n'
        f'cert = "{pki.fullchain}"\nkey = "{pki.privkey}"\n'
        f'state_dir = "{work / "state"}"\ngrace_period = 5\n'
        f'[cache]\nmax_size = "{cache_size}"\n'
        '[access]\ntrusted_proxies = ["127.0.0.1"]\n'
        f'[access.users]\n{USER} = "{make_hash(PASSWORD)}"\n'
        f'[registries."docker.io"]\nupstreams = ["{hub_url}"]\n'
    )
    return Process("mirrord", mirrord_argv("--config", str(config)), port, work / "mirrord.log")


def tracebacks(log: Path) -> list[str]:
    text = log.read_text(errors="replace")
    return [line for line in text.splitlines() if "Traceback" in line or "Unhandled" in line]


def mib(value: float) -> str:
    return f"{value / MIB:.1f} MiB"


def window(samples: list[Sample], start: float, end: float, total: float) -> list[Sample]:
    return [s for s in samples if start * total <= s.at <= end * total]


def summary(
    args: argparse.Namespace,
    tally: Tally,
    samples: list[Sample],
    before: Sample,
    quiet: Sample,
    logged: list[str],
    elapsed: float,
) -> tuple[str, list[str]]:
    """The report, and the reasons the run failed (empty if it passed)."""
    problems: list[str] = []
    warm = window(samples, 0.1, 0.3, elapsed) or samples[:1]
    end = window(samples, 0.8, 1.0, elapsed) or samples[-1:]
    warm_rss = statistics.median(s.rss for s in warm)
    end_rss = statistics.median(s.rss for s in end)
    rss_limit = warm_rss * (1 + RSS_TOLERANCE[0]) + RSS_TOLERANCE[1]
    warm_fds = max(s.fds for s in warm)
    end_fds = statistics.median(s.fds for s in end)
    lines = [
        f"soak: {elapsed / 60:.1f} minutes, {args.clients} clients, seed {args.seed}, "
        f"cache {args.cache_size}, {len(samples)} samples every {args.interval:g} s",
        "",
        "| action | completed | failed |",
        "|---|---|---|",
    ]
    for action in MIX:
        lines.append(f"| {action} | {tally.ok[action]} | {tally.failed[action]} |")
    lines += [
        "",
        f"verified bodies: {tally.verified_blobs} ({mib(tally.verified_bytes)}); "
        f"digest failures: {tally.digest_failures}",
        "",
        "| daemon | before load | warm (10-30 %) | peak | end (80-100 %) | after load |",
        "|---|---|---|---|---|---|",
        f"| RSS | {mib(before.rss)} | {mib(warm_rss)} | {mib(max(s.rss for s in samples))} "
        f"| {mib(end_rss)} | {mib(quiet.rss)} |",
        f"| open fds | {before.fds} | {warm_fds} (max) | {max(s.fds for s in samples)} "
        f"| {end_fds:g} (median) | {quiet.fds} |",
        "",
        f"tolerance: end RSS <= warm x {1 + RSS_TOLERANCE[0]:g} + {mib(RSS_TOLERANCE[1])} "
        f"({mib(rss_limit)}); end fds <= warm max + {FD_TOLERANCE}; "
        f"fds after the load <= warm max",
        f"tracebacks in the daemon's log: {len(logged)}",
    ]
    if tally.digest_failures:
        problems.append(f"{tally.digest_failures} bodies failed their digest")
    if sum(tally.failed.values()):
        problems.append(f"{sum(tally.failed.values())} actions failed")
    if end_rss > rss_limit:
        problems.append(f"RSS grew from {mib(warm_rss)} to {mib(end_rss)}")
    if end_fds > warm_fds + FD_TOLERANCE:
        problems.append(f"open fds grew from {warm_fds} to {end_fds:g}")
    if quiet.fds > warm_fds:
        problems.append(f"{quiet.fds} fds still open after the load (warm max {warm_fds})")
    if logged:
        problems.append(f"the daemon logged {len(logged)} traceback lines")
    if tally.examples:
        lines += ["", "first failures:", *(f"  {e}" for e in tally.examples)]
    return "\n".join(lines), problems


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--clients", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--interval", type=float, default=5, help="seconds between samples")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--big-mib", type=int, default=32, help="size of each big blob")
    parser.add_argument(
        "--cache-size", default="48MiB", help="mirrord's [cache] max_size (default: churn)"
    )
    parser.add_argument("--stall-max", type=float, default=20, help="longest stall, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="mirrord-soak-"))
    started_processes: list[Process] = []
    failed = True
    try:
        print(f"soak: work directory {work}", file=sys.stderr)
        pki = make_pki(work / "pki")
        layouts = {
            "library/alpine": images.single_arch(work / "img-alpine"),
            "library/multi": images.multi_arch(work / "img-multi"),
            "owner/app": images.single_arch(work / "img-app", layer_sizes=(300_000, 1_000_000)),
        }
        big_paths: dict[str, Path] = {}
        for i in range(2):
            path = work / f"big{i}.bin"
            big_paths[make_big(path, args.big_mib * MIB)] = path
        hub = start_hub(work, layouts, big_paths)
        started_processes.append(hub)
        mirror = start_mirror(work, pki, f"http://127.0.0.1:{hub.port}", args.cache_size)
        started_processes.append(mirror)
        mirror.start()
        context = ssl.create_default_context(cafile=str(pki.ca))
        world = World(
            mirror.port,
            context,
            [Image(name, layout.tag, layout) for name, layout in layouts.items()],
            {digest: path.stat().st_size for digest, path in big_paths.items()},
            timeout=60,
            stall_max=args.stall_max,
        )
        tally = Tally()
        started = time.monotonic()
        before = sample(mirror.pid, started)
        deadline = started + args.minutes * 60
        samples: list[Sample] = []
        done = threading.Event()

        def sampler() -> None:
            next_report = started + 60
            while not done.wait(args.interval):
                try:
                    samples.append(sample(mirror.pid, started))
                except OSError:
                    return  # the daemon is gone: the clients will say so
                if time.monotonic() >= next_report:
                    next_report += 60
                    last = samples[-1]
                    print(
                        f"soak: {last.at / 60:.0f} min, RSS {mib(last.rss)}, {last.fds} fds, "
                        f"{sum(tally.ok.values())} done, {sum(tally.failed.values())} failed, "
                        f"{tally.digest_failures} digest failures",
                        file=sys.stderr,
                    )

        threads = [
            threading.Thread(
                target=Client(world, tally, random.Random(args.seed * 1000 + i), i).run,
                args=(deadline,),
                name=f"client-{i}",
                daemon=True,  # Ctrl-C ends the run without waiting for them
            )
            for i in range(args.clients)
        ]
        watcher = threading.Thread(target=sampler, name="sampler", daemon=True)
        watcher.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        done.set()
        watcher.join()
        elapsed = time.monotonic() - started
        time.sleep(5)  # let the daemon close what the clients left
        if mirror.proc is not None and mirror.proc.poll() is not None:
            print(f"FAILED: mirrord died during the soak:\n{mirror.output()[-3000:]}")
            return 1
        quiet = sample(mirror.pid, started)
        if not samples:
            samples.append(quiet)
        code = mirror.stop()
        logged = tracebacks(mirror.log)
        report, problems = summary(args, tally, samples, before, quiet, logged, elapsed)
        print(report)
        if code not in (0, None):
            problems.append(f"mirrord exited {code} on SIGTERM")
        if problems:
            print("\nFAILED: " + "; ".join(problems))
            return 1
        print("\nPASSED")
        failed = False
        return 0
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return 130
    finally:
        for process in reversed(started_processes):
            process.stop()
        if failed or args.keep:
            print(f"soak: logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
