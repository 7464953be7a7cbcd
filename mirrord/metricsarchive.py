"""A dead worker's metric files, merged into one archive per kind.

prometheus_client's multiprocess mode keeps one file per process and kind
(``counter_<pid>.db``, ``gauge_mostrecent_<pid>.db``...) and every read
(``/metrics``, the status page, each history sample) opens them all. Its
``mark_process_dead`` removes only the live gauges' files, so a worker that
keeps dying would leave thousands of files a day to be read on the reactor.
When a worker dies, the supervisor (``archive_dead``) adds its values into
``<kind>_archive.db`` (a file in the same format, which the collector sums
like any other, since it reads the kind from the name) and deletes the
dead worker's files: the totals stay exactly the same, the files bounded
by the live workers plus one archive per kind.

A reader must never see the dead worker's values twice (in the new archive
and its old file) nor not at all: the new archive is written beside the
others under a name the collector does not read, then renamed into place
and the dead files removed while holding ``LOCK`` exclusively; readers
(``LockedCollector``) hold it shared while they glob and read. The
exclusive part is a rename and a few unlinks, so a reader waits microseconds.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

LOCK = ".lock"
ARCHIVE = "archive"


@contextmanager
def locked(directory: Path, how: int) -> Iterator[None]:
    """Hold ``LOCK`` in ``directory`` (``fcntl.LOCK_SH`` or ``LOCK_EX``)."""
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)  # releases the lock


class LockedCollector(MultiProcessCollector):
    """The multiprocess collector, reading under the shared lock so that an
    archiving in progress is seen entirely before or entirely after."""

    def __init__(self, registry: object, path: Path) -> None:
        super().__init__(registry, str(path))
        self._directory = path

    def collect(self) -> list[Metric]:
        with locked(self._directory, fcntl.LOCK_SH):
            return list(super().collect())


def _merge(
    mode: str, old: tuple[float, float] | None, new: tuple[float, float]
) -> tuple[float, float]:
    """One key's (value, timestamp) in the archive, given the dead worker's."""
    if old is None:
        return new
    if mode == "min":
        return min(old, new, key=lambda pair: pair[0])
    if mode == "max":
        return max(old, new, key=lambda pair: pair[0])
    if mode == "mostrecent":
        return new if new[1] > old[1] else old
    return (old[0] + new[0], max(old[1], new[1]))  # counters, histograms, sum gauges


def archive_dead(pid: int, directory: Path) -> None:
    """Worker ``pid`` is dead: its live gauges go, its other values move
    into the archives, its files are deleted. A gauge of mode ``all`` (one
    series per process, by definition) keeps its file."""
    groups: dict[str, list[Path]] = {}
    for path in directory.glob(f"*_{pid}.db"):
        parts = path.name[: -len(".db")].split("_")
        if parts[-1] != str(pid):
            continue
        kind = "_".join(parts[:-1])  # "counter", "gauge_mostrecent"...
        if kind.startswith("gauge_live") or kind == "gauge_all":
            continue
        groups.setdefault(kind, []).append(path)
    written: list[tuple[Path, Path]] = []
    try:
        for kind, paths in groups.items():
            mode = kind.split("_", 1)[1] if kind.startswith("gauge_") else kind
            archive = directory / f"{kind}_{ARCHIVE}.db"
            values: dict[str, tuple[float, float]] = {}
            for source in [archive, *paths] if archive.exists() else paths:
                for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(str(source)):
                    values[key] = _merge(mode, values.get(key), (value, timestamp))
            temporary = directory / f"{kind}_{ARCHIVE}.db.new"
            temporary.unlink(missing_ok=True)
            out = MmapedDict(str(temporary))
            try:
                for key, (value, timestamp) in values.items():
                    out.write_value(key, value, timestamp)
            finally:
                out.close()
            written.append((temporary, archive))
        with locked(directory, fcntl.LOCK_EX):
            for temporary, archive in written:
                os.replace(temporary, archive)
            for paths in groups.values():
                for path in paths:
                    path.unlink(missing_ok=True)
            mark_process_dead(pid, str(directory))
    finally:
        for temporary, _ in written:
            temporary.unlink(missing_ok=True)
