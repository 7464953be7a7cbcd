"""What the worker processes of one host share so that the mirror looks
like one to its clients and its operator: the per-client counts the guard
limits (``clienttable``), the metric files every ``/metrics`` sums
(``mirrord.metrics``) and the status page's history (``history``), all in
the directory the supervisor makes for them. The one process of
``workers = 1`` uses none of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mirrord.front.clienttable import ClientTable, clear_worker, table_path
from mirrord.front.history import SharedRing
from mirrord.metrics import multiprocess_dir, worker_died

HISTORY_FILE = "history"


@dataclass
class WorkerShare:
    """Worker ``index``'s view of the shared state."""

    metrics_dir: Path
    table: ClientTable
    ring: SharedRing
    # The one worker that adds the status history's samples.
    sampler: bool

    @classmethod
    def open(
        cls, index: int, count: int, shared_dir: Path, now: Callable[[], float]
    ) -> WorkerShare:
        shared_dir.mkdir(parents=True, exist_ok=True)
        return cls(
            multiprocess_dir(shared_dir),
            ClientTable(table_path(shared_dir), count, index, now),
            SharedRing(shared_dir / HISTORY_FILE),
            sampler=index <= 1,
        )


def worker_gone(index: int, pid: int, shared_dir: Path) -> None:
    """For the supervisor, when worker ``index`` (process ``pid``) has
    died, before it starts another in its place: the dead worker's
    connections, requests in flight and fills in progress stop counting.
    Its counters stay in the totals."""
    clear_worker(shared_dir, index)
    directory = multiprocess_dir(shared_dir)
    if directory.is_dir():
        worker_died(pid, directory)
