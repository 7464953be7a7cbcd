"""nginx configurations for the benchmark: the upstream registry (plain and
TLS) in an instance of its own, and the nginx proxies mirrord is compared
with in two more, one worker and two workers.

The upstream runs apart from the proxies so that the nginx under test has
its worker(s) to itself, as mirrord has its process(es): with one shared
``worker_processes 1`` the tuned proxy and the upstream it reads from would
take turns on one event loop.

The proxy settings are the seed's (``proxy_buffering off``, 4 KiB relay
buffer) and the tuned ones (``proxy_buffer_size 256k``), as before; the
cache is nginx's ``proxy_cache`` with ``proxy_cache_lock``.
"""

from __future__ import annotations

import os
from pathlib import Path

MAIN = """
{user}
worker_processes {workers};
pid {work}/{name}.pid;
error_log {work}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  keepalive_requests 1000000;
  types {{ }}
  default_type application/octet-stream;
  ssl_certificate {cert}; ssl_certificate_key {key};
{http}
}}
"""

REGISTRY = """
    location = /v2/ {{ default_type application/json; return 200 '{{}}'; }}
    location ~ ^/v2/library/bench/blobs/(sha256:[a-f0-9]+)$ {{ alias {data}/$1; }}
    location ~ ^/v2/library/bench/manifests/(latest|{manifest_digest})$ {{
      default_type application/vnd.oci.image.manifest.v1+json;
      add_header Docker-Content-Digest {manifest_digest};
      alias {data}/manifest.json;
    }}
"""

TUNED = """proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off;
                 proxy_buffer_size 256k; proxy_buffers 4 256k; proxy_busy_buffers_size 256k;"""


def upstream_http(ports: dict[str, int], work: Path, registry: str) -> str:
    """The registry: plain HTTP, the same over TLS, and ``direct`` (TLS, the
    port clients reach without a proxy: the practical limit)."""
    log = f"access_log {work}/upstream-access.log;"
    return f"""
  server {{ listen 127.0.0.1:{ports["upstream"]}; {log} {registry} }}
  server {{ listen 127.0.0.1:{ports["upstream_tls"]} ssl; {log} {registry} }}
  server {{ listen 127.0.0.1:{ports["direct"]} ssl; {registry} }}
"""


def proxies_http(ports: dict[str, int], work: Path, ca: Path, suffix: str) -> str:
    """seed, tuned, tuned over a TLS upstream, and the cache; ports are
    looked up as ``seed{suffix}`` and so on (suffix "2" for the two-worker
    instance)."""
    plain = f"http://127.0.0.1:{ports['upstream']}"
    tls = f"https://127.0.0.1:{ports['upstream_tls']}"
    return f"""
  proxy_cache_path {work}/nginx-cache{suffix} levels=1:2 keys_zone=blobs{suffix}:10m
                   max_size=40g inactive=1d use_temp_path=off;
  server {{
    listen 127.0.0.1:{ports["seed" + suffix]} ssl;
    location / {{ proxy_pass {plain}; proxy_http_version 1.1;
                 proxy_set_header Connection ""; proxy_buffering off; }}
  }}
  server {{
    listen 127.0.0.1:{ports["tuned" + suffix]} ssl;
    location / {{ proxy_pass {plain}; {TUNED} }}
  }}
  server {{
    listen 127.0.0.1:{ports["tuned_tls" + suffix]} ssl;
    location / {{ proxy_pass {tls}; {TUNED}
                 proxy_ssl_trusted_certificate {ca}; proxy_ssl_verify on;
                 proxy_ssl_name localhost; }}
  }}
  server {{
    listen 127.0.0.1:{ports["cached" + suffix]} ssl;
    location / {{ proxy_pass {plain}; {TUNED}
                 proxy_cache blobs{suffix}; proxy_cache_valid 200 1d;
                 proxy_cache_lock on; proxy_cache_lock_timeout 60s;
                 proxy_cache_lock_age 60s; }}
  }}
"""


def write_conf(
    path: Path, *, name: str, workers: int | str, work: Path, cert: Path, key: Path, http: str
) -> Path:
    path.write_text(
        MAIN.format(
            # Run as root, workers would be www-data, which cannot enter the
            # private work directory that holds nginx's cache.
            user="user root;" if os.geteuid() == 0 else "",
            workers=workers,
            name=name,
            work=work,
            cert=cert,
            key=key,
            http=http,
        )
    )
    return path
