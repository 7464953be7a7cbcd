"""Real processes for end-to-end tests: start on loopback, wait until they
listen, stop them by PID. Every wait is bounded."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEAD_PORT = 9  # discard: nothing listens there, so a stray request fails at once


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def twistd() -> str:
    """The twistd installed beside the running Python (the README's install)."""
    beside = Path(sys.executable).parent / "twistd"
    return str(beside) if beside.exists() else shutil.which("twistd") or "twistd"


def mirrord_argv(*options: str) -> list[str]:
    """``twistd mirrord`` in the foreground, as the unit and README run it
    (with the unit's logger: what is measured in ``bench/`` is what runs);
    one process (``--workers 1``) unless ``options`` say ``--workers N``
    (the last one given wins), so tests behave as they did before workers
    and start fast."""
    return [
        twistd(),
        "--nodaemon",
        "--pidfile=",
        "--logger=mirrord.daemon.logs.observer",
        "mirrord",
        "--workers",
        "1",
        *options,
    ]


@dataclass
class Process:
    name: str
    argv: list[str]
    port: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> Process:
        self._out = self.log.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **self.env},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen on {self.port}:\n{self.output()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def peak_rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM")


def run(
    argv: list[str], timeout: float = 120, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{argv} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result
