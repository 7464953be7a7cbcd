"""Benchmark: mirrord against nginx (tuned, one worker; two workers for the
workers rows) and against a bare Twisted TLS site, on every path issue 13
names, in one run.

Interleaved rounds: each round runs every measure once, in an order
rotated from the round before, so a slow minute of a shared machine lands
on different rows in different rounds instead of on one row. Each ratio is
taken within a round and reported as the median over the rounds with its
spread (min-max). Everything listens on 127.0.0.1; every load is bounded
in count and time; every process started here is stopped by PID.

Run: ``sudo bench/run`` (``--rounds``, ``--only ROWS``, ``--list``).
Prints a Markdown table and writes it to ``bench/results.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from bench import fleet, machine, nginx, procs, tools  # noqa: E402
from bench.rows import ROWS, measures_for, render  # noqa: E402
from tests.support.pki import Pki, make_pki  # noqa: E402
from tests.support.processes import Process, free_port, mirrord_argv  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
BLOBS = "/v2/library/bench/blobs/"


def make_blob(path: Path, size: int) -> str:
    """A random blob (made once, kept in bench/.data) and its digest."""
    digest_file = path.with_suffix(".sha256")
    if path.exists() and path.stat().st_size == size and digest_file.exists():
        return digest_file.read_text()
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(size >> 20):
            chunk = os.urandom(MIB)
            digest.update(chunk)
            f.write(chunk)
    value = "sha256:" + digest.hexdigest()
    digest_file.write_text(value)
    return value


class Skip(Exception):
    """A measure that cannot run on this build (the reason is printed)."""


@dataclass
class Daemon:
    """A running ``twistd mirrord`` and the workers it forked, if any."""

    process: Process
    state_dir: Path
    port: int
    workers: list[int] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        """The processes that serve: the workers (looked up each time: a
        supervisor replaces one that dies), or the one process."""
        if self.workers:
            self.workers = procs.children(self.process.pid) or self.workers
        return self.workers or [self.process.pid]

    def cpu(self) -> float:
        return sum(procs.cpu_seconds(p) for p in {self.process.pid, *self.pids})

    def rss_kib(self) -> int:
        return sum(procs.rss_kib(p) for p in self.pids)

    def peak_rss_kib(self) -> int:
        """The largest peak of one serving process (RSS per worker)."""
        return max(procs.peak_rss_kib(p) for p in self.pids)

    def stop(self) -> None:
        workers = procs.children(self.process.pid) or self.workers
        self.process.stop(timeout=30)
        if killed := procs.reap(workers):
            print(f"  ! killed workers {killed} left after their supervisor stopped", flush=True)


class Bench:
    """The servers and the measures. Servers that keep state between
    rounds (the warm mirrors, the nginx caches) start once; a cold measure
    starts a mirrord of its own on an empty state directory and stops it
    after."""

    def __init__(self, args: argparse.Namespace, work: Path, pki: Pki) -> None:
        self.args = args
        self.work = work
        self.pki = pki
        self.started: list[Process] = []
        self.daemons: dict[str, Daemon] = {}
        self.fleet: fleet.Fleet | None = None
        self.skipped: dict[str, str] = {}
        self.workers_key = True  # does the daemon know `workers`?
        self.fresh = 0
        self.nginx_keys = 0
        self.ports = {
            k: free_port()
            for k in (
                "upstream",
                "upstream_tls",
                "direct",
                "seed",
                "tuned",
                "tuned_tls",
                "cached",
                "seed2",
                "tuned2",
                "tuned_tls2",
                "cached2",
                "bare",
            )
        }

    # -- setup ---------------------------------------------------------

    def prepare_data(self) -> None:
        data = HERE / ".data"
        data.mkdir(exist_ok=True)
        self.data = data
        self.big = make_blob(data / "big.bin", self.args.size_mib * MIB)
        self.mid = make_blob(data / "mid.bin", self.args.concurrent_size_mib * MIB)
        for name, digest in (("big.bin", self.big), ("mid.bin", self.mid)):
            link = data / digest
            if not link.is_symlink() or link.resolve() != data / name:
                link.unlink(missing_ok=True)
                link.symlink_to(data / name)
        # About the size of a real image manifest (1 KiB), the body the
        # issue's figures were measured with.
        layers = [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": "sha256:" + hashlib.sha256(bytes([i])).hexdigest(),
                "size": 1000 + i,
            }
            for i in range(5)
        ]
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": layers[0],
                "layers": layers[1:],
            }
        ).encode()
        (data / "manifest.json").write_bytes(manifest)
        self.manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()

    def start_nginx(self) -> None:
        registry = nginx.REGISTRY.format(data=self.data, manifest_digest=self.manifest_digest)
        confs = {
            "nginx-upstream": ("auto", nginx.upstream_http(self.ports, self.work, registry)),
            "nginx-1": (1, nginx.proxies_http(self.ports, self.work, self.pki.ca, "")),
            "nginx-2": (2, nginx.proxies_http(self.ports, self.work, self.pki.ca, "2")),
        }
        first_port = {"nginx-upstream": "upstream", "nginx-1": "tuned", "nginx-2": "tuned2"}
        for name, (workers, http) in confs.items():
            conf = nginx.write_conf(
                self.work / f"{name}.conf",
                name=name,
                workers=workers,
                work=self.work,
                cert=self.pki.fullchain,
                key=self.pki.privkey,
                http=http,
            )
            argv = ["nginx", "-c", str(conf), "-g", "daemon off;"]
            process = Process(name, argv, self.ports[first_port[name]], self.work / f"{name}.log")
            self.started.append(process.start())

    def start_bare(self) -> None:
        argv = [
            sys.executable,
            str(HERE / "bare_site.py"),
            "--port",
            str(self.ports["bare"]),
            "--cert",
            str(self.pki.fullchain),
            "--key",
            str(self.pki.privkey),
            "--body",
            str(self.data / "manifest.json"),
            "--digest",
            self.manifest_digest,
        ]
        process = Process("bare", argv, self.ports["bare"], self.work / "bare.log")
        self.started.append(process.start())

    def mirrord(
        self,
        name: str,
        config: str,
        *,
        tls_upstream: bool = False,
        workers: int = 1,
        port: int | None = None,
    ) -> Daemon:
        """Start a mirrord; ``workers`` goes into its config when the
        daemon knows the key (a daemon before the supervisor refuses it:
        then one process is what it runs anyway, and ``workers > 1``
        raises Skip). ``port`` when the config must name it (a fleet
        member advertises its address)."""
        state = self.work / name
        upstream = (
            f"https://127.0.0.1:{self.ports['upstream_tls']}"
            if tls_upstream
            else f"http://127.0.0.1:{self.ports['upstream']}"
        )
        if tls_upstream:
            config = f'upstream_ca = "{self.pki.ca}"\n' + config
        port = port or free_port()
        path = self.work / f"{name}.toml"
        keyed = self.workers_key or workers > 1
        path.write_text((f"workers = {workers}\n" if keyed else "") + config)
        argv = mirrord_argv(
            "--config",
            str(path),
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--cert",
            str(self.pki.fullchain),
            "--key",
            str(self.pki.privkey),
            "--state-dir",
            str(state),
            "--upstream",
            upstream,
            # The command line wins over the file, and the tests' argv
            # says --workers 1 first: the last one given is what counts.
            *(("--workers", str(workers)) if keyed else ()),
        )
        process = Process(name, argv, port, self.work / f"{name}.log")
        try:
            process.start(timeout=60)
        except RuntimeError as e:
            # Never crash the run on the workers rows: whatever stops a
            # `workers = 2` daemon is reported and its rows skipped.
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            if workers > 1:
                said = [line for line in lines if "workers" in line] or lines
                why = said[-1].split(" (known keys")[0]
                raise Skip(f"the daemon refused `workers = {workers}`: {why}") from None
            if not keyed or "workers" not in str(e):
                raise
            self.workers_key = False
            print("  (this mirrord has no `workers` key: one process, the key left out)")
            return self.mirrord(name, config, tls_upstream=tls_upstream)
        daemon = Daemon(process, state, port)
        print(f"  started {name}: pid {process.pid}", flush=True)
        try:
            self.url_ok(f"https://127.0.0.1:{port}/v2/")
        except RuntimeError:
            daemon.stop()
            raise
        # Whatever serves: the workers a supervisor started, or the process
        # itself when it has no children.
        daemon.workers = procs.children(process.pid)
        if workers > 1:
            deadline = time.monotonic() + 20
            while len(daemon.workers) < workers and time.monotonic() < deadline:
                daemon.workers = procs.children(process.pid)
                time.sleep(0.2)
            if len(daemon.workers) < workers:
                daemon.stop()
                raise Skip(
                    f"`workers = {workers}` accepted, but {len(daemon.workers)} worker "
                    "processes appeared within 20 s"
                )
            print(f"    workers: {daemon.workers}", flush=True)
        return daemon

    def start_fleet(self, needed: set[str]) -> None:
        """RGW and Redis for the fleet rows, once per run, and the blob
        the S3 hits read put in its bucket. Whatever stops them (no Ceph
        on this machine...) skips those rows, never the run."""
        if not needed & fleet.MEASURES:
            return
        try:
            self.fleet = fleet.Fleet.start(self)
        except Exception as e:
            self.skipped["fleet"] = f"RGW or Redis did not start: {str(e).splitlines()[0]}"
            print(f"  skipped: fleet: {self.skipped['fleet']}", flush=True)
            return
        if "fleet hit" in needed:
            try:
                self.fleet.seed()
            except Exception as e:
                self.skipped["fleet hit"] = f"the blob did not get into the bucket: {e}"
                print(f"  skipped: fleet hit: {self.skipped['fleet hit']}", flush=True)

    def started_fleet(self, measure: str) -> fleet.Fleet:
        if why := self.skipped.get(measure):
            raise Skip(why)
        if self.fleet is None:
            raise Skip(self.skipped.get("fleet", "the fleet was not started"))
        return self.fleet

    def url_ok(self, url: str, tries: int = 50) -> None:
        for _ in range(tries):
            try:
                tools.curl(url, self.pki.ca, timeout=10)
                return
            except (tools.ToolError, subprocess.TimeoutExpired):
                time.sleep(0.2)
        raise RuntimeError(f"{url} never answered 200")

    def start_mirrors(self, needed: set[str]) -> None:
        long_ttl = "[cache]\ntag_ttl = 3600\n"
        cache_off = "[cache]\nenabled = false\n"
        wanted = {
            "mirrord": ("", long_ttl, False, 1),
            "mirrord proxy": ("proxy", cache_off, False, 1),
            "mirrord proxy tls": ("proxy", cache_off, True, 1),
            "mirrord w2": ("w2", long_ttl, False, 2),
        }
        uses = {
            "mirrord": ("mirrord warm", "mirrord digest", "mirrord tag", "ab mirrord", "w1 x16"),
            "mirrord proxy": ("mirrord proxy", "slow proxy"),
            "mirrord proxy tls": ("mirrord proxy tls",),
            "mirrord w2": ("w2 x16", "w2 digest"),
        }
        for name, (_, config, tls, workers) in wanted.items():
            if not needed & set(uses[name]):
                continue
            try:
                self.daemons[name] = self.mirrord(name, config, tls_upstream=tls, workers=workers)
            except Skip as e:
                self.skipped[name] = str(e)
                print(f"  skipped: {name}: {e}", flush=True)

    def warm_up(self, needed: set[str]) -> None:
        """Fill the caches the warm measures read, and the page cache."""
        ca = self.pki.ca
        # The workers = 2 mirror serves only the concurrent blob and the
        # manifest; each is asked for a few times, so that every worker
        # has answered it once whichever way the kernel spreads connections.
        paths = {
            "mirrord": (BLOBS + self.big, BLOBS + self.mid, self.tag_path, self.digest_path),
            "mirrord w2": (BLOBS + self.mid, self.digest_path),
        }
        for name, wanted in paths.items():
            if daemon := self.daemons.get(name):
                base = f"https://127.0.0.1:{daemon.port}"
                for path in wanted:
                    for _ in range(4 if daemon.workers else 1):
                        tools.curl(base + path, ca, timeout=self.args.stream_timeout)
        nginx_warm = {
            "": {"nginx warm", "nginx1 x16", "nginx digest", "ab nginx"},
            "2": {"nginx2 x16", "nginx2 digest"},
        }
        for suffix, uses in nginx_warm.items():
            if not needed & uses:
                continue
            base = f"https://127.0.0.1:{self.ports['cached' + suffix]}"
            blobs = (BLOBS + self.big, BLOBS + self.mid) if suffix == "" else (BLOBS + self.mid,)
            for path in blobs:
                tools.curl(base + path + "?run=warm", ca, timeout=self.args.stream_timeout)
            tools.curl(base + self.digest_path, ca)

    @property
    def tag_path(self) -> str:
        return "/v2/library/bench/manifests/latest"

    @property
    def digest_path(self) -> str:
        return f"/v2/library/bench/manifests/{self.manifest_digest}"

    def stop_all(self) -> None:
        for daemon in self.daemons.values():
            daemon.stop()
        if self.fleet is not None:
            self.fleet.stop()
        for process in reversed(self.started):
            process.stop(timeout=30)

    # -- measures --------------------------------------------------------

    def nginx_url(self, server: str, path: str) -> str:
        return f"https://127.0.0.1:{self.ports[server]}{path}"

    def daemon_url(self, name: str, path: str) -> str:
        daemon = self.daemons.get(name)
        if daemon is None:
            raise Skip(self.skipped.get(name, f"{name} not started"))
        return f"https://127.0.0.1:{daemon.port}{path}"

    def single(
        self, url: str, daemon: Daemon | None = None, size: int | None = None
    ) -> dict[str, float]:
        size = size or self.args.size_mib * MIB
        before = daemon.cpu() if daemon else 0.0
        download = tools.curl(url, self.pki.ca, timeout=self.args.stream_timeout)
        if download.size != size:
            raise tools.ToolError(f"{url}: {download.size} bytes, not {size}")
        figures = {"speed": download.speed}
        if daemon:
            figures["cpu"] = (daemon.cpu() - before) / (size / GIB)
        return figures

    def upstream_fetches(self, digest: str) -> int:
        log = self.work / "upstream-access.log"
        needle = f'"GET {BLOBS}{digest}'
        with log.open() as f:
            return sum(needle in line for line in f)

    def many(self, url: str) -> dict[str, float]:
        """``--concurrent`` clients of one blob at once."""
        return self.clients([url] * self.args.concurrent)

    def clients(self, urls: list[str]) -> dict[str, float]:
        """A client per URL (each the concurrent blob, through one server
        or several) at once: wall time to the last byte, and how many GETs
        of the blob reached the upstream meanwhile."""
        n, size = len(urls), self.args.concurrent_size_mib * MIB
        fetched = self.upstream_fetches(self.mid)
        started = time.monotonic()
        with ThreadPoolExecutor(n) as pool:
            downloads = list(
                pool.map(
                    lambda url: tools.curl(url, self.pki.ca, timeout=self.args.stream_timeout),
                    urls,
                )
            )
        wall = time.monotonic() - started
        if bad := [d.size for d in downloads if d.size != size]:
            raise tools.ToolError(f"{urls[0]}: sizes {bad}, not {size}")
        return {
            "wall": wall,
            "aggregate": n * size / wall,
            "fetches": self.upstream_fetches(self.mid) - fetched,
        }

    def fresh_mirrord(self, workers: int = 1) -> Daemon:
        self.fresh += 1
        return self.mirrord(f"cold-{self.fresh}", "", workers=workers)

    def finish_fresh(self, daemon: Daemon) -> None:
        daemon.stop()
        shutil.rmtree(daemon.state_dir, ignore_errors=True)

    def cold(self) -> dict[str, float]:
        daemon = self.fresh_mirrord()
        try:
            url = f"https://127.0.0.1:{daemon.port}{BLOBS}{self.big}"
            return self.single(url, daemon)
        finally:
            self.finish_fresh(daemon)

    def cold_many(self, workers: int = 1) -> dict[str, float]:
        daemon = self.fresh_mirrord(workers)
        try:
            url = f"https://127.0.0.1:{daemon.port}{BLOBS}{self.mid}"
            figures = self.many(url)
            figures["peak_rss"] = daemon.peak_rss_kib() / 1024
            return figures
        finally:
            self.finish_fresh(daemon)

    def nginx_cold(self) -> dict[str, float]:
        # A new cache key (the upstream ignores the query) makes it cold.
        self.nginx_keys += 1
        return self.single(self.nginx_url("cached", f"{BLOBS}{self.big}?run={self.nginx_keys}"))

    def warm_many(self, name: str) -> dict[str, float]:
        daemon = self.daemons.get(name)
        figures = self.many(self.daemon_url(name, BLOBS + self.mid))
        assert daemon is not None
        figures["peak_rss"] = daemon.peak_rss_kib() / 1024
        return figures

    def rate(self, url: str) -> dict[str, float]:
        result = tools.wrk(url, self.args.load_seconds)
        return {"rate": result.per_second, "timeouts": result.timeouts}

    def ab_rate(self, url: str) -> dict[str, float]:
        result = tools.ab(url, self.args.load_seconds)
        share = (result.keep_alive or 0) / result.requests if result.requests else 0.0
        return {"rate": result.per_second, "keep_alive": share}

    def slow(self, daemon: Daemon, url: str) -> dict[str, float]:
        """One client reading a big blob at ``--slow-rate``: how far the
        serving processes' RSS rises above where it stood before."""
        before = daemon.rss_kib()
        peak, settled = before, None
        argv = tools.curl_argv(url, self.pki.ca, self.args.slow_seconds, self.args.slow_rate)
        client = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            start = time.monotonic()
            while time.monotonic() - start < self.args.slow_seconds and client.poll() is None:
                rss = daemon.rss_kib()
                peak = max(peak, rss)
                if settled is None and time.monotonic() - start >= 1.0:
                    settled = rss  # the buffers a stream needs are there by now
                time.sleep(0.2)
        finally:
            client.kill()  # by its PID
            client.wait(10)
        figures = {"growth": (peak - before) / 1024, "before": before / 1024}
        if settled is not None:
            figures["late"] = (peak - settled) / 1024
        return figures

    def slow_cold(self) -> dict[str, float]:
        daemon = self.fresh_mirrord()
        try:
            self.url_ok(f"https://127.0.0.1:{daemon.port}{self.digest_path}")
            return self.slow(daemon, f"https://127.0.0.1:{daemon.port}{BLOBS}{self.big}")
        finally:
            self.finish_fresh(daemon)

    def measures(self) -> dict[str, Callable[[], dict[str, float]]]:
        big, mid = BLOBS + self.big, BLOBS + self.mid
        d = self.daemons.get
        return {
            "seed": lambda: self.single(self.nginx_url("seed", big)),
            "tuned": lambda: self.single(self.nginx_url("tuned", big)),
            "tuned tls": lambda: self.single(self.nginx_url("tuned_tls", big)),
            "mirrord proxy": lambda: self.single(
                self.daemon_url("mirrord proxy", big), d("mirrord proxy")
            ),
            "mirrord proxy tls": lambda: self.single(
                self.daemon_url("mirrord proxy tls", big), d("mirrord proxy tls")
            ),
            "mirrord cold": self.cold,
            "nginx cold": self.nginx_cold,
            "mirrord warm": lambda: self.single(self.daemon_url("mirrord", big), d("mirrord")),
            "nginx warm": lambda: self.single(self.nginx_url("cached", big + "?run=warm")),
            "tuned x16": lambda: self.many(self.nginx_url("tuned", mid)),
            "mirrord cold x16": self.cold_many,
            "w2 cold x16": lambda: self.cold_many(workers=2),
            "bare digest": lambda: self.rate(self.nginx_url("bare", self.digest_path)),
            "mirrord digest": lambda: self.rate(self.daemon_url("mirrord", self.digest_path)),
            "mirrord tag": lambda: self.rate(self.daemon_url("mirrord", self.tag_path)),
            "tuned digest": lambda: self.rate(self.nginx_url("tuned", self.digest_path)),
            "nginx digest": lambda: self.rate(self.nginx_url("cached", self.digest_path)),
            "ab mirrord": lambda: self.ab_rate(self.daemon_url("mirrord", self.digest_path)),
            "ab bare": lambda: self.ab_rate(self.nginx_url("bare", self.digest_path)),
            "ab nginx": lambda: self.ab_rate(self.nginx_url("cached", self.digest_path)),
            "w1 x16": lambda: self.warm_many("mirrord"),
            "w2 x16": lambda: self.warm_many("mirrord w2"),
            "nginx1 x16": lambda: self.many(self.nginx_url("cached", mid + "?run=warm")),
            "nginx2 x16": lambda: self.many(self.nginx_url("cached2", mid + "?run=warm")),
            "w2 digest": lambda: self.rate(self.daemon_url("mirrord w2", self.digest_path)),
            "nginx2 digest": lambda: self.rate(self.nginx_url("cached2", self.digest_path)),
            "slow proxy": lambda: self.slow(
                d("mirrord proxy") or _skip("mirrord proxy not started"),
                self.daemon_url("mirrord proxy", big),
            ),
            "slow cold": self.slow_cold,
            "fleet hit": lambda: self.started_fleet("fleet hit").hit(),
            "fleet cold two": lambda: self.started_fleet("fleet cold two").cold(members=2),
            "fleet cold one": lambda: self.started_fleet("fleet cold one").cold(members=1),
        }


def _skip(reason: str) -> NoReturn:
    raise Skip(reason)


def rotated(items: list[str], round_index: int, rounds: int) -> list[str]:
    """The round's order: the list rotated by a fraction of its length per
    round, so each round starts at a different part of it."""
    if not items:
        return []
    step = math.ceil(len(items) / max(rounds, 1))
    shift = (round_index * step) % len(items)
    return items[shift:] + items[:shift]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="rows: " + ", ".join(row.key for row in ROWS),
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--only", default="", help="comma-separated row keys (default: all; see --list)"
    )
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    parser.add_argument("--size-mib", type=int, default=1024, help="single-stream blob")
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--concurrent-size-mib", type=int, default=256)
    parser.add_argument("--load-seconds", type=int, default=8, help="per wrk/ab run")
    parser.add_argument("--slow-seconds", type=int, default=8)
    parser.add_argument("--slow-rate", default="4M", help="the slow client's rate (curl)")
    parser.add_argument("--stream-timeout", type=int, default=300, help="per download")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=40,
        help="start no new round after this long (the rounds done are reported)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results.md")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    known = {row.key for row in ROWS}
    if unknown := [k for k in keys if k not in known]:
        parser.error(f"unknown rows {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    args.rows = [row for row in ROWS if not keys or row.key in keys]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.list:
        for row in ROWS:
            print(f"{row.key:18} {row.label} (target: {row.target})")
        return
    for tool in ("nginx", "curl", "wrk", "ab"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"bench needs {tool}: apt-get install nginx-light curl wrk apache2-utils")

    # A SIGTERM to the benchmark unwinds through the finally below, which
    # stops every server it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench: terminated"))
    started = time.monotonic()
    head = machine.describe()
    for what, value in head:
        print(f"{what}: {value}", flush=True)
    needed = measures_for(args.rows)
    work = Path(tempfile.mkdtemp(prefix="mirrord-bench-"))
    bench = Bench(args, work, make_pki(work / "pki"))
    results: list[dict[str, dict[str, float] | str]] = []
    try:
        bench.prepare_data()
        bench.start_nginx()
        if needed & {"bare digest", "ab bare"}:
            bench.start_bare()
        bench.start_mirrors(needed)
        bench.start_fleet(needed)
        bench.warm_up(needed)
        table = bench.measures()
        order = [name for name in table if name in needed]
        for r in range(args.rounds):
            if r and time.monotonic() - started > args.max_minutes * 60:
                print(f"--max-minutes reached: {r} rounds of {args.rounds}", flush=True)
                break
            print(f"round {r + 1}/{args.rounds}", flush=True)
            outcome: dict[str, dict[str, float] | str] = {}
            for name in rotated(order, r, args.rounds):
                t0 = time.monotonic()
                try:
                    outcome[name] = table[name]()
                except Skip as e:
                    outcome[name] = f"skipped: {e}"
                except Exception as e:  # one failed measure never ends the run
                    outcome[name] = f"failed: {type(e).__name__}: {e}"
                shown = outcome[name]
                if isinstance(shown, dict):
                    shown = ", ".join(f"{k}={v:.4g}" for k, v in shown.items())
                print(f"  {name}: {shown} ({time.monotonic() - t0:.1f} s)", flush=True)
            results.append(outcome)
    finally:
        bench.stop_all()
        shutil.rmtree(work, ignore_errors=True)  # caches of several GiB

    minutes = (time.monotonic() - started) / 60
    settings = (
        f"{len(results)} round{'s, interleaved' if len(results) > 1 else ''}; "
        f"{args.size_mib} MiB blob for single streams, "
        f"{args.concurrent} clients x {args.concurrent_size_mib} MiB for the concurrent rows, "
        f"{args.load_seconds} s per wrk/ab run (32 connections), slow client at "
        f"`curl --limit-rate {args.slow_rate}` for {args.slow_seconds} s; "
        f"the run took {minutes:.1f} minutes"
    )
    if needed & fleet.MEASURES:
        settings += (
            f"; fleet rows: the {args.concurrent_size_mib} MiB blob, members in front of the "
            "same nginx upstream sharing one bucket on a one-node Ceph RGW (memstore, "
            "in RAM) and one redis-server, each measure on fresh members"
        )
    text = render(args.rows, results, head, settings, bench.skipped)
    print(text)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
