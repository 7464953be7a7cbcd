"""What /proc says about the processes under test: their children (the
workers a supervisor forked), resident and peak memory, CPU time. Plain
/proc reading, no psutil: the benchmark runs with the project's own venv.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def children(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """The PIDs of ``pid``'s direct children (every thread's list: a child
    forked from a thread other than the main one is listed under that
    thread). Empty if the process is gone."""
    found: list[int] = []
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except FileNotFoundError:
        return []
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return sorted(set(found))


def status_kib(pid: int, field: str, proc: Path = Path("/proc")) -> int:
    """A ``kB`` field of /proc/PID/status (``VmRSS``, ``VmHWM``)."""
    for line in (proc / str(pid) / "status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(f"no {field} for {pid}")


def rss_kib(pid: int) -> int:
    return status_kib(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int:
    return status_kib(pid, "VmHWM")


def cpu_seconds(pid: int, proc: Path = Path("/proc")) -> float:
    """User + system CPU of a process (all its threads)."""
    fields = (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def reap(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Wait for processes that should be exiting (a stopped supervisor's
    workers), then SIGKILL, by PID, any still there. Returns those killed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    killed = [p for p in pids if alive(p)]
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return killed
