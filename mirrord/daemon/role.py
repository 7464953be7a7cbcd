"""Which process of the daemon this is: the only one (``workers = 1``), or
worker *i* of *n* started by the supervisor. The supervisor tells its
children through the environment, so that a child knows its role before it
imports anything that cares (prometheus_client reads its multiprocess
directory at import time).

Everything shared between workers lives under ``shared_dir``, which the
supervisor empties before it starts them: counters for the per-client
limits, the metrics files, the workers' own sockets.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

WORKER = "MIRRORD_WORKER"
WORKERS = "MIRRORD_WORKERS"
SHARED_DIR = "MIRRORD_SHARED_DIR"


@dataclass(frozen=True)
class Role:
    """``index`` counts from 1; 0 means "not a worker" (the one process)."""

    index: int = 0
    count: int = 1
    shared_dir: Path | None = None

    @property
    def is_worker(self) -> bool:
        return self.index > 0

    @property
    def runs_singletons(self) -> bool:
        """True where the jobs that must run once per host run: the admin
        socket, ACME, the warm service, the status history."""
        return self.index <= 1

    def environ(self) -> dict[str, str]:
        """What the supervisor puts in a child's environment."""
        assert self.shared_dir is not None
        return {
            WORKER: str(self.index),
            WORKERS: str(self.count),
            SHARED_DIR: str(self.shared_dir),
        }

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Role:
        env = os.environ if environ is None else environ
        if WORKER not in env:
            return cls()
        return cls(int(env[WORKER]), int(env.get(WORKERS, "1")), Path(env[SHARED_DIR]))


def usable_cores() -> int:
    """The cores this process may run on (its affinity, as a container or
    ``taskset`` sets it), the default number of workers."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
