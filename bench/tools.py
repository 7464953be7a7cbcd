"""The load tools the benchmark drives (curl, wrk, ApacheBench) and the
parsing of what they print. Every call is bounded in time (and ab's in
count too); a tool that overruns is killed by subprocess.run, by PID.

The parsers are pure functions of the tool's output so that
tests/test_bench.py can check them on captured output: a parser that
misreads a number, or misses the line that says some requests failed,
would make the whole table quietly wrong.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path


class ToolError(RuntimeError):
    """A tool's run cannot be counted (errors, wrong answers, no figure)."""


@dataclass(frozen=True)
class Download:
    speed: float  # bytes per second, as curl measured it
    size: int
    code: int


def parse_curl(stdout: str) -> Download:
    """curl's ``-w '%{speed_download} %{size_download} %{http_code}'``."""
    try:
        speed, size, code = stdout.split()
        return Download(float(speed), int(size), int(code))
    except ValueError:
        raise ToolError(f"curl printed {stdout!r}") from None


def curl_argv(url: str, ca: Path, timeout: float, limit_rate: str | None = None) -> list[str]:
    argv = ["curl", "-sS", "--noproxy", "*", "--cacert", str(ca), "-o", "/dev/null"]
    argv += ["--max-time", str(timeout), "-w", "%{speed_download} %{size_download} %{http_code}"]
    if limit_rate:
        argv += ["--limit-rate", limit_rate]
    return [*argv, url]


def curl(url: str, ca: Path, timeout: float = 120) -> Download:
    """One download, body discarded; anything but a 200 is an error."""
    result = subprocess.run(
        curl_argv(url, ca, timeout), capture_output=True, text=True, timeout=timeout + 10
    )
    if result.returncode != 0:
        raise ToolError(f"curl {url}: exit {result.returncode}: {result.stderr.strip()}")
    download = parse_curl(result.stdout)
    if download.code != 200:
        raise ToolError(f"{url} answered {download.code}")
    return download


@dataclass(frozen=True)
class Rate:
    per_second: float
    requests: int
    keep_alive: int | None = None  # ab only: requests that reused a connection
    timeouts: int = 0  # wrk only: requests not answered within its --timeout


_WRK_RATE = re.compile(r"^Requests/sec:\s+([0-9.]+)\s*$", re.M)
_WRK_COUNT = re.compile(r"^\s*(\d+) requests in ", re.M)


_WRK_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
TIMEOUT_SHARE = 0.001  # of the requests made: more, and the run is not counted


def parse_wrk(stdout: str) -> Rate:
    """wrk's summary. Non-2xx answers, connect, read or write errors make the
    run invalid (a server that answers errors fast would otherwise look
    fast); so do timeouts beyond ``TIMEOUT_SHARE`` of the requests. A few
    timeouts are tolerated and counted: on a loaded shared machine wrk
    reports a handful for any server, nginx included."""
    if "Non-2xx or 3xx responses" in stdout:
        line = next(line for line in stdout.splitlines() if "Non-2xx" in line)
        raise ToolError(f"wrk: {line.strip()}")
    rate, count = _WRK_RATE.search(stdout), _WRK_COUNT.search(stdout)
    if not rate or not count:
        raise ToolError(f"wrk printed no rate:\n{stdout}")
    requests, timeouts = int(count.group(1)), 0
    if "Socket errors" in stdout:
        errors = _WRK_SOCKET.search(stdout)
        if not errors:
            raise ToolError(f"wrk: unreadable socket errors:\n{stdout}")
        connect, read, write, timeouts = (int(g) for g in errors.groups())
        if connect or read or write or timeouts > TIMEOUT_SHARE * requests:
            raise ToolError(f"wrk: {errors.group(0)} of {requests} requests")
    return Rate(float(rate.group(1)), requests, timeouts=timeouts)


def wrk(url: str, seconds: int, connections: int = 32, threads: int = 2) -> Rate:
    """GET requests per second over HTTP/1.1 keep-alive connections."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", url]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    if result.returncode != 0:
        raise ToolError(f"wrk exit {result.returncode}: {result.stderr.strip()}")
    return parse_wrk(result.stdout)


def _ab_field(stdout: str, name: str) -> str | None:
    match = re.search(rf"^{re.escape(name)}:\s+(\S+)", stdout, re.M)
    return match.group(1) if match else None


def parse_ab(stdout: str) -> Rate:
    """ApacheBench's summary: failed or non-2xx requests make it invalid."""
    rate, complete = (
        _ab_field(stdout, "Requests per second"),
        _ab_field(stdout, "Complete requests"),
    )
    failed = _ab_field(stdout, "Failed requests")
    if rate is None or complete is None or failed is None:
        raise ToolError(f"ab printed no rate:\n{stdout}")
    if failed != "0":
        raise ToolError(f"ab: {failed} failed requests")
    if (non_2xx := _ab_field(stdout, "Non-2xx responses")) is not None:
        raise ToolError(f"ab: {non_2xx} non-2xx responses")
    keep_alive = _ab_field(stdout, "Keep-Alive requests")
    return Rate(float(rate), int(complete), int(keep_alive) if keep_alive is not None else None)


def ab(url: str, seconds: int, connections: int = 32, limit: int = 500_000) -> Rate:
    """HTTP/1.0 GETs with ``-k`` (Connection: keep-alive), bounded by time
    and by count."""
    argv = ["ab", "-k", "-q", "-c", str(connections), "-t", str(seconds), "-n", str(limit), url]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    if result.returncode != 0:
        raise ToolError(f"ab exit {result.returncode}: {result.stderr.strip()}")
    return parse_ab(result.stdout)
