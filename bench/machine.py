"""What the benchmark ran on, stated at the top of its output: figures
from another machine (or another OpenSSL) are not comparable, and a
shared machine's load at the start says how far to trust the absolutes.

Twisted's TLS runs on the OpenSSL that pyOpenSSL's ``cryptography`` wheel
bundles, nginx on the system's: both are named, since they can differ by a
major version.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path


def cpu_model(cpuinfo: str) -> str:
    """The first ``model name`` of /proc/cpuinfo (or ``unknown``)."""
    match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    return match.group(1).strip() if match else "unknown"


def nginx_versions(nginx_v: str) -> tuple[str, str]:
    """nginx's version and the OpenSSL it runs with, from ``nginx -V``'s
    stderr (``built with OpenSSL X (running with OpenSSL Y)`` when they differ)."""
    version = re.search(r"nginx version: nginx/(\S+)", nginx_v)
    running = re.search(r"running with (OpenSSL [^)\s]+)", nginx_v)
    built = re.search(r"built with (OpenSSL \S+)", nginx_v)
    openssl = running or built
    return (
        version.group(1) if version else "unknown",
        openssl.group(1) if openssl else "unknown",
    )


def _nginx_v() -> str:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    try:
        return subprocess.run([nginx, "-V"], capture_output=True, text=True, timeout=10).stderr
    except (OSError, subprocess.TimeoutExpired):
        return ""


def describe() -> list[tuple[str, str]]:
    """(what, value) pairs for the head of the results."""
    import cryptography
    from OpenSSL import SSL

    import twisted

    cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    total = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0))
    nginx, nginx_openssl = nginx_versions(_nginx_v())
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    pyopenssl = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    mem = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return [
        ("CPU", cpu_model(cpuinfo)),
        ("cores usable", f"{usable} of {total}"),
        ("memory", f"{int(mem.group(1)) >> 20} GiB" if mem else "unknown"),
        ("kernel", platform.release()),
        ("load average at start", load),
        ("Python", platform.python_version()),
        ("Twisted", twisted.__version__),
        ("OpenSSL (Twisted, via cryptography " + cryptography.__version__ + ")", pyopenssl),
        ("nginx", f"{nginx} with {nginx_openssl}"),
        ("curl (the client)", curl_version(_output(["curl", "--version"]))),
    ]


def curl_version(curl_version_output: str) -> str:
    """``curl 7.88.1 with OpenSSL/3.0.19`` from ``curl --version``."""
    match = re.match(
        r"curl (\S+) .*?((?:OpenSSL|LibreSSL|BoringSSL|GnuTLS)/\S+)", curl_version_output
    )
    return f"{match.group(1)} with {match.group(2)}" if match else "unknown"


def _output(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
