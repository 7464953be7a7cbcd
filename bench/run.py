"""Benchmark: mirrord against the client fetching upstream directly and
against nginx as the seed configures it and tuned.

Everything listens on 127.0.0.1; every load is bounded in count and time;
every process started here is stopped by PID. Run: ``sudo bench/run``.
Prints a Markdown table and writes it to ``bench/results.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from tests.support.pki import make_pki  # noqa: E402
from tests.support.processes import Process, free_port, mirrord_argv  # noqa: E402

GIB = 1 << 30


def make_blob(path: Path, size: int) -> str:
    """A random blob (made once, kept in bench/.data) and its digest."""
    digest_file = path.with_suffix(".sha256")
    if path.exists() and path.stat().st_size == size and digest_file.exists():
        return digest_file.read_text()
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(size >> 20):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            f.write(chunk)
    value = "sha256:" + digest.hexdigest()
    digest_file.write_text(value)
    return value


NGINX_CONF = """
{user}
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  proxy_cache_path {work}/nginx-cache levels=1:2 keys_zone=blobs:10m max_size=20g
                   inactive=1d use_temp_path=off;
  sendfile on;
  keepalive_requests 100000;
  types {{ }}
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{upstream};
    access_log {work}/upstream-access.log;
    {registry_locations}
  }}
  server {{
    listen 127.0.0.1:{direct} ssl;
    ssl_certificate {cert}; ssl_certificate_key {key};
    {registry_locations}
  }}
  server {{
    listen 127.0.0.1:{upstream_tls} ssl;
    ssl_certificate {cert}; ssl_certificate_key {key};
    access_log {work}/upstream-access.log;
    {registry_locations}
  }}
  server {{
    listen 127.0.0.1:{seed} ssl;
    ssl_certificate {cert}; ssl_certificate_key {key};
    location / {{ proxy_pass http://127.0.0.1:{upstream}; proxy_http_version 1.1;
                 proxy_set_header Connection ""; proxy_buffering off; }}
  }}
  server {{
    listen 127.0.0.1:{tuned} ssl;
    ssl_certificate {cert}; ssl_certificate_key {key};
    location / {{ proxy_pass http://127.0.0.1:{upstream}; proxy_http_version 1.1;
                 proxy_set_header Connection ""; proxy_buffering off;
                 proxy_buffer_size 256k; proxy_buffers 4 256k;
                 proxy_busy_buffers_size 256k; }}
  }}
  server {{
    listen 127.0.0.1:{tuned_tls} ssl;
    ssl_certificate {cert}; ssl_certificate_key {key};
    location / {{ proxy_pass https://127.0.0.1:{upstream_tls}; proxy_http_version 1.1;
                 proxy_set_header Connection ""; proxy_buffering off;
                 proxy_ssl_trusted_certificate {ca}; proxy_ssl_verify on;
                 proxy_ssl_name localhost;
                 proxy_buffer_size 256k; proxy_buffers 4 256k;
                 proxy_busy_buffers_size 256k; }}
  }}
  server {{
    listen 127.0.0.1:{cached} ssl;
    ssl_certificate {cert}; ssl_certificate_key {key};
    location / {{ proxy_pass http://127.0.0.1:{upstream}; proxy_http_version 1.1;
                 proxy_set_header Connection ""; proxy_cache blobs;
                 proxy_cache_valid 200 1d; proxy_cache_lock on;
                 proxy_cache_lock_timeout 60s; proxy_cache_lock_age 60s;
                 proxy_buffer_size 256k; proxy_buffers 4 256k;
                 proxy_busy_buffers_size 256k; }}
  }}
}}
"""

REGISTRY_LOCATIONS = """
    location = /v2/ {{ default_type application/json; return 200 '{{}}'; }}
    location ~ ^/v2/library/bench/blobs/(sha256:[a-f0-9]+)$ {{ alias {data}/$1; }}
    location = /v2/library/bench/manifests/latest {{
      default_type application/vnd.oci.image.manifest.v1+json;
      add_header Docker-Content-Digest {manifest_digest};
      alias {data}/manifest.json;
    }}
"""


SINGLE_ROWS = (
    "direct",
    "seed",
    "tuned",
    "mirrord proxy",
    "nginx cache cold",
    "mirrord cold",
    "nginx cache warm",
    "mirrord warm",
    "tuned tls",
    "mirrord proxy tls",
    "mirrord cold tls",
)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def curl(url: str, ca: Path, timeout: float = 120) -> tuple[float, int]:
    """Bytes per second and bytes for one download, body discarded."""
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--cacert",
            str(ca),
            "-o",
            "/dev/null",
            "--max-time",
            str(timeout),
            "-w",
            "%{speed_download} %{size_download} %{http_code}",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    speed, size, code = result.stdout.split()
    if code != "200":
        raise RuntimeError(f"{url} answered {code}")
    return float(speed), int(size)


def wrk_get(url: str, seconds: int) -> float:
    """GET requests per second: wrk, 2 threads, 32 keep-alive connections."""
    result = subprocess.run(
        ["wrk", "-t2", "-c32", f"-d{seconds}s", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    )
    if "Non-2xx" in result.stdout or "Socket errors" in result.stdout:
        raise RuntimeError(result.stdout)
    for line in result.stdout.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise RuntimeError(result.stdout)


def ab_head(url: str, seconds: int) -> float:
    """HEAD requests per second. wrk cannot measure HEAD: its parser waits
    for the body a HEAD answer's Content-Length announces (0 requests/s seen
    here against nginx), so ApacheBench's -i does it: 32 keep-alive
    connections, bounded by time and count."""
    result = subprocess.run(
        ["ab", "-i", "-k", "-q", "-c", "32", "-t", str(seconds), "-n", "500000", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    )
    if "Non-2xx" in result.stdout or "Failed requests:        0" not in result.stdout:
        raise RuntimeError(result.stdout)
    for line in result.stdout.splitlines():
        if line.startswith("Requests per second:"):
            return float(line.split()[3])
    raise RuntimeError(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="single-stream runs per row (median)")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--concurrent-size-mib", type=int, default=256)
    parser.add_argument("--load-seconds", type=int, default=8)
    parser.add_argument(
        "--single-only", action="store_true", help="only the single-stream rows (quick)"
    )
    parser.add_argument(
        "--rows",
        default=",".join(SINGLE_ROWS),
        help="comma-separated single-stream rows; a subset implies --single-only",
    )
    args = parser.parse_args()
    rows_wanted = [row.strip() for row in args.rows.split(",")]
    if unknown := set(rows_wanted) - set(SINGLE_ROWS):
        sys.exit(f"unknown rows: {', '.join(sorted(unknown))}; known: {', '.join(SINGLE_ROWS)}")
    for tool in ("nginx", "curl", "wrk", "ab"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"bench needs {tool}: apt-get install nginx-light curl wrk apache2-utils")

    data = HERE / ".data"
    data.mkdir(exist_ok=True)
    big = make_blob(data / "big.bin", args.size_mib << 20)
    mid = make_blob(data / "mid.bin", args.concurrent_size_mib << 20)
    for name, digest in (("big.bin", big), ("mid.bin", mid)):
        link = data / digest
        if not link.exists():
            link.symlink_to(data / name)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {},
            "layers": [],
        }
    ).encode()
    (data / "manifest.json").write_bytes(manifest)
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()

    work = Path(tempfile.mkdtemp(prefix="mirrord-bench-"))
    pki = make_pki(work / "pki")
    ports = {
        k: free_port()
        for k in (
            "upstream",
            "upstream_tls",
            "direct",
            "seed",
            "tuned",
            "tuned_tls",
            "cached",
            "mirrord",
            "mirrord proxy",
            "mirrord tls",
            "mirrord proxy tls",
        )
    }
    locations = REGISTRY_LOCATIONS.format(data=data, manifest_digest=manifest_digest)
    conf = work / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            # Run as root, workers would be www-data, which cannot enter the
            # private work directory that holds nginx's cache.
            user="user root;" if os.geteuid() == 0 else "",
            work=work,
            cert=pki.fullchain,
            key=pki.privkey,
            ca=pki.ca,
            registry_locations=locations,
            **ports,
        )
    )
    nginx = Process(
        "nginx",
        ["nginx", "-c", str(conf), "-g", "daemon off;"],
        ports["upstream"],
        work / "nginx.log",
    ).start()

    def start_mirrord(name: str, config: str, upstream: str) -> Process:
        (work / f"{name}.toml").write_text(config)
        return Process(
            name,
            mirrord_argv(
                "--config",
                str(work / f"{name}.toml"),
                "--listen",
                f"tcp:{ports[name]}:interface=127.0.0.1",
                "--cert",
                str(pki.fullchain),
                "--key",
                str(pki.privkey),
                "--state-dir",
                str(work / name),
                "--upstream",
                upstream,
            ),
            ports[name],
            work / f"{name}.log",
        ).start()

    plain = f"http://127.0.0.1:{ports['upstream']}"
    over_tls = f"https://127.0.0.1:{ports['upstream_tls']}"
    trust = f'upstream_ca = "{pki.ca}"\n'
    cache_off = "[cache]\nenabled = false\n"
    mirror = start_mirrord("mirrord", "", plain)
    proxy = start_mirrord("mirrord proxy", cache_off, plain)
    mirror_tls = start_mirrord("mirrord tls", trust, over_tls)
    proxy_tls = start_mirrord("mirrord proxy tls", trust + cache_off, over_tls)
    mirrors = {
        "mirrord": mirror,
        "mirrord proxy": proxy,
        "mirrord tls": mirror_tls,
        "mirrord proxy tls": proxy_tls,
    }

    def cache_blobs(name: str) -> Path:
        return work / name / "cache" / "blobs"

    nginx_runs = iter(range(1000))

    def url(name: str, path: str) -> str:
        if name.startswith("nginx cache"):
            # A new cache key (the upstream ignores the query) makes it cold.
            query = f"?run={next(nginx_runs)}" if name.endswith("cold") else "?run=warm"
            return f"https://127.0.0.1:{ports['cached']}{path}{query}"
        return f"https://127.0.0.1:{ports[server(name)]}{path}"

    def server(row: str) -> str:
        """The server (a key of ``ports``) behind a row's name."""
        base, tls = row.removesuffix(" tls"), row.endswith(" tls")
        if base.startswith("mirrord"):
            base = "mirrord proxy" if base == "mirrord proxy" else "mirrord"
            return base + " tls" if tls else base
        return base + "_tls" if tls else base

    def upstream_fetches(digest: str) -> int:
        log = work / "upstream-access.log"
        return sum(f"GET /v2/library/bench/blobs/{digest}" in line for line in log.open())

    try:
        blob_path = f"/v2/library/bench/blobs/{big}"
        single: dict[str, tuple[float, float | None]] = {}
        for name in rows_wanted:
            cold = "cold" in name
            if not cold:
                curl(url(name, blob_path), pki.ca)  # warm page cache, connections, the cache
            speeds, cpu = [], 0.0
            is_mirror = name.startswith("mirrord")
            pid = mirrors[server(name)].pid if is_mirror else 0
            for _ in range(args.runs):
                if cold:
                    shutil.rmtree(cache_blobs(server(name)), ignore_errors=True)
                before = cpu_seconds(pid) if is_mirror else 0.0
                speed, size = curl(url(name, blob_path), pki.ca)
                cpu += cpu_seconds(pid) - before if is_mirror else 0.0
                assert size == args.size_mib << 20
                speeds.append(speed)
            single[name] = (
                statistics.median(speeds),
                cpu / args.runs / (size / GIB) if is_mirror else None,
            )
        rss_single = mirror.peak_rss_kib()
        if args.single_only or rows_wanted != list(SINGLE_ROWS):
            for name, (speed, cpu) in single.items():
                print(f"{name}: {speed / 1e6:.0f} MB/s cpu={cpu}")
            return

        def concurrent(name: str) -> tuple[float, int]:
            if name == "mirrord cold":
                shutil.rmtree(cache_blobs("mirrord"), ignore_errors=True)
            target = url(name, f"/v2/library/bench/blobs/{mid}")
            fetched = upstream_fetches(mid)
            started = time.monotonic()
            with ThreadPoolExecutor(args.concurrent) as pool:
                sizes = list(pool.map(lambda _: curl(target, pki.ca)[1], range(args.concurrent)))
            assert all(s == args.concurrent_size_mib << 20 for s in sizes)
            return time.monotonic() - started, upstream_fetches(mid) - fetched

        conc = {
            name: concurrent(name)
            for name in ("seed", "tuned", "mirrord proxy", "nginx cache cold", "mirrord cold")
        }
        rss_concurrent = mirror.peak_rss_kib()
        rss_proxy = proxy.peak_rss_kib()
        tag_path = "/v2/library/bench/manifests/latest"
        digest_path = f"/v2/library/bench/manifests/{manifest_digest}"
        curl(url("mirrord", tag_path), pki.ca)  # cache the manifest
        rates = {
            name: (
                ab_head(url(name, tag_path), args.load_seconds),
                wrk_get(url(name, tag_path), args.load_seconds),
            )
            for name in ("direct", "seed", "tuned", "mirrord")
        }
        rates["mirrord, by digest"] = (
            ab_head(url("mirrord", digest_path), args.load_seconds),
            wrk_get(url("mirrord", digest_path), args.load_seconds),
        )
    finally:
        for process in mirrors.values():
            process.stop()
        os.kill(nginx.pid, signal.SIGQUIT)
        nginx.proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)  # caches of several GiB

    labels = {
        "direct": "client straight to upstream over TLS (nginx)",
        "seed": "nginx as the seed configures it (`proxy_buffering off`)",
        "tuned": "nginx tuned (`proxy_buffer_size 256k`)",
        "mirrord proxy": "mirrord with the cache off (streaming proxy)",
        "mirrord cold": "mirrord, cold (miss: fetch, verify, store while streaming)",
        "mirrord warm": "mirrord, warm (hit: from its cache)",
        "nginx cache cold": "nginx caching (`proxy_cache`, `proxy_cache_lock`), cold",
        "nginx cache warm": "nginx caching (`proxy_cache`), warm",
        "tuned tls": "nginx tuned, upstream over TLS",
        "mirrord proxy tls": "mirrord with the cache off, upstream over TLS",
        "mirrord cold tls": "mirrord, cold, upstream over TLS",
        "mirrord": "mirrord (HEAD revalidates the tag upstream)",
        "mirrord, by digest": "mirrord, by digest (from its cache)",
    }
    rows = [
        f"| {args.size_mib} MiB blob, one client | MB/s | vs tuned nginx (same upstream)"
        " | mirrord CPU s/GiB |",
        "|---|---|---|---|",
    ]
    for name, (speed, cpu) in single.items():
        tuned = single["tuned tls" if name.endswith(" tls") else "tuned"][0]
        cpu_text = "-" if cpu is None else f"{cpu:.2f}"
        rows.append(f"| {labels[name]} | {speed / 1e6:.0f} | {speed / tuned:.2f}x | {cpu_text} |")
    total = args.concurrent * (args.concurrent_size_mib << 20)
    rows += [
        "",
        f"| {args.concurrent} concurrent clients x {args.concurrent_size_mib} MiB (one blob)"
        " | wall s | aggregate MB/s | upstream fetches |",
        "|---|---|---|---|",
    ]
    for name, (seconds, fetches) in conc.items():
        rows.append(f"| {labels[name]} | {seconds:.1f} | {total / seconds / 1e6:.0f} | {fetches} |")
    rows += [
        "",
        f"mirrord peak RSS: {rss_single / 1024:.0f} MiB after the single streams, "
        f"{rss_concurrent / 1024:.0f} MiB after the {args.concurrent} concurrent clients"
        f" (cache off: {rss_proxy / 1024:.0f} MiB).",
        "",
        "| manifest over TLS, 32 keep-alive connections | HEAD/s (ab -i) | GET/s (wrk) |",
        "|---|---|---|",
    ]
    for name, (head, get) in rates.items():
        rows.append(f"| {labels[name]} | {head:.0f} | {get:.0f} |")
    table = "\n".join(rows)
    print(table)
    (HERE / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
