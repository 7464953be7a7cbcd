"""The content-addressed store on disk: write while hashing, verify,
publish; an index of what is there, least recently used first; eviction.

No Twisted here. Layout under the cache root (as distribution lays it out)::

    blobs/sha256/ab/<hex>/data       the bytes, verified against <hex>
    blobs/sha256/ab/<hex>/meta.json  media type, repository, whether public
    tags/<registry>/<repository>/<tag>.json   the digest a tag last had
    tmp/                             fills in progress; emptied at startup

A blob becomes visible only after its length and digest match (temporary
file, fsync, rename), so unverified bytes never become a hit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import fnmatch
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path


class DigestMismatch(Exception):
    """The bytes did not hash to the digest they were fetched for."""


@dataclass
class Meta:
    """What a blob's answer needs besides its bytes, and who may see it."""

    media_type: str = "application/octet-stream"
    repository: str = ""
    public: bool = False
    # The registry the repository belongs to (the same name can mean
    # different content, and different owners, on two registries).
    registry: str = ""


@dataclass
class Entry:
    digest: str
    size: int
    meta: Meta
    last_access: float
    readers: int = 0


def _writeback_starter() -> Callable[[int, int, int], None]:
    """``sync_file_range(SYNC_FILE_RANGE_WRITE)``: start writing dirty pages
    out without waiting, so the fsync that publishes a blob finds little
    left to do (a 1 GiB fsync would otherwise stall the reactor for
    seconds). A no-op where Linux's call is missing."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, length: None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    write = 2  # SYNC_FILE_RANGE_WRITE

    def start(fd: int, offset: int, length: int) -> None:
        call(fd, offset, length, write)

    return start


_start_writeback = _writeback_starter()
WRITEBACK_EVERY = 16 << 20
TOUCH_EVERY = 3600.0
TAG_REFRESH_EVERY = 60.0


class TempBlob:
    """A blob being written to a temporary file. Its hash is the caller's
    (see ``mirrord.store.worker``): publishing needs the hex digest."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.size = 0
        self._synced = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self.size += len(data)
        if self.size - self._synced >= WRITEBACK_EVERY:
            _start_writeback(self._fd, self._synced, self.size - self._synced)
            self._synced = self.size

    def matches(self, digest: str, hexdigest: str, size: int | None) -> bool:
        return hexdigest == digest.split(":", 1)[1] and size in (None, self.size)

    def finish(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        self.closed = True

    def discard(self) -> None:
        if not self.closed:
            os.close(self._fd)
            self.closed = True
        self.path.unlink(missing_ok=True)


@dataclass
class BlobStore:
    """Verified blobs by digest, with a size limit and LRU eviction."""

    root: Path
    max_size: int
    high_watermark: float = 0.95
    low_watermark: float = 0.85
    pinned: tuple[str, ...] = ()
    now: Callable[[], float] = time.time
    entries: dict[str, Entry] = field(default_factory=dict)
    size: int = 0

    def __post_init__(self) -> None:
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        (self.root / "blobs").mkdir(exist_ok=True)

    def blob_dir(self, digest: str) -> Path:
        algorithm, hexdigest = digest.split(":", 1)
        return self.root / "blobs" / algorithm / hexdigest[:2] / hexdigest

    def data_path(self, digest: str) -> Path:
        return self.blob_dir(digest) / "data"

    def rebuild(self) -> tuple[int, int]:
        """Index what is on disk; remove interrupted fills. Returns (entries, removed)."""
        removed = 0
        for temp in (self.root / "tmp").iterdir():
            temp.unlink(missing_ok=True)
            removed += 1
        self.entries.clear()
        self.size = 0
        for data in (self.root / "blobs").glob("*/*/*/data"):
            hexdigest, algorithm = data.parent.name, data.parent.parent.parent.name
            digest = f"{algorithm}:{hexdigest}"
            try:
                stat = data.stat()
                meta = Meta(**json.loads((data.parent / "meta.json").read_text()))
            except (OSError, ValueError, TypeError):
                # A blob without readable metadata is unusable: drop it.
                self._remove_files(digest)
                removed += 1
                continue
            self.entries[digest] = Entry(digest, stat.st_size, meta, stat.st_mtime)
            self.size += stat.st_size
        return len(self.entries), removed

    def new_temp(self) -> TempBlob:
        return TempBlob(self.root / "tmp" / uuid.uuid4().hex)

    def publish(
        self, temp: TempBlob, digest: str, hexdigest: str, meta: Meta, size: int | None = None
    ) -> Entry:
        """Check ``temp``'s ``hexdigest`` (and size) against ``digest``; move it into place."""
        if not temp.matches(digest, hexdigest, size):
            temp.discard()
            raise DigestMismatch(
                f"{digest}: received {temp.size} bytes hashing to {hexdigest[:16]}..."
            )
        temp.finish()
        directory = self.blob_dir(digest)
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(directory / "meta.json", json.dumps(asdict(meta)).encode())
        now = self.now()
        os.utime(temp.path, (now, now))
        os.replace(temp.path, directory / "data")
        previous = self.entries.get(digest)
        if previous is not None:
            self.size -= previous.size
        entry = Entry(digest, temp.size, meta, now)
        if previous is not None:
            entry.readers = previous.readers
        self.entries[digest] = entry
        self.size += entry.size
        return entry

    def update_meta(self, digest: str, meta: Meta) -> None:
        entry = self.entries.get(digest)
        if entry is None:
            return
        entry.meta = meta
        _write_atomically(self.blob_dir(digest) / "meta.json", json.dumps(asdict(meta)).encode())

    def put_bytes(self, digest: str, data: bytes, meta: Meta) -> Entry:
        temp = self.new_temp()
        temp.write(data)
        algorithm = digest.split(":", 1)[0]
        return self.publish(temp, digest, hashlib.new(algorithm, data).hexdigest(), meta, len(data))

    def get(self, digest: str) -> Entry | None:
        """The entry for a digest, marked as just used; ``None`` if absent."""
        entry = self.entries.get(digest)
        if entry is None:
            return None
        path = self.data_path(digest)
        if not path.exists():
            self._forget(entry)
            return None
        now = self.now()
        if now - entry.last_access > TOUCH_EVERY:
            # The file's mtime carries the access order across restarts.
            try:
                os.utime(path, (now, now))
            except OSError:
                pass
        entry.last_access = now
        return entry

    def read(self, digest: str) -> bytes | None:
        """A small blob's bytes (manifests)."""
        entry = self.get(digest)
        if entry is None:
            return None
        try:
            return self.data_path(digest).read_bytes()
        except OSError:
            return None

    def is_pinned(self, entry: Entry) -> bool:
        """Pinned by a repository pattern (``library/*``)."""
        return any(
            fnmatch.fnmatchcase(entry.meta.repository, p) for p in self.pinned if ":" not in p
        )

    def pinned_by_tag(self) -> set[str]:
        """Everything a pinned tag (``library/alpine:3.*``) needs: its
        manifest, and what that manifest references, recursively."""
        patterns = [p for p in self.pinned if ":" in p]
        keep: set[str] = set()
        if not patterns:
            return keep
        for name, tag, record in TagStore(self.root).records():
            if any(fnmatch.fnmatchcase(f"{name}:{tag}", p) for p in patterns):
                self._referenced(record.digest, keep)
        return keep

    def _referenced(self, digest: str, keep: set[str]) -> None:
        if digest in keep:
            return
        keep.add(digest)
        entry = self.entries.get(digest)
        if entry is None or entry.size > 4 << 20 or "json" not in entry.meta.media_type:
            return
        try:
            document = json.loads(self.data_path(digest).read_bytes())
        except (OSError, ValueError):
            return
        if not isinstance(document, dict):
            return
        children = [
            document.get("config"),
            *document.get("layers", []),
            *document.get("manifests", []),
        ]
        for child in children:
            if isinstance(child, dict) and isinstance(child.get("digest"), str):
                self._referenced(child["digest"], keep)

    def evict(self) -> list[str]:
        """Above the high watermark, remove least recently used blobs until
        under the low one. Blobs being read and pinned blobs stay."""
        if self.size <= self.max_size * self.high_watermark:
            return []
        target = self.max_size * self.low_watermark
        removed = []
        keep = self.pinned_by_tag()
        for entry in sorted(self.entries.values(), key=lambda e: e.last_access):
            if self.size <= target:
                break
            if entry.readers or entry.digest in keep or self.is_pinned(entry):
                continue
            self._forget(entry)
            self._remove_files(entry.digest)
            removed.append(entry.digest)
        return removed

    def _forget(self, entry: Entry) -> None:
        if self.entries.pop(entry.digest, None) is not None:
            self.size -= entry.size

    def _remove_files(self, digest: str) -> None:
        directory = self.blob_dir(digest)
        for name in ("data", "meta.json"):
            (directory / name).unlink(missing_ok=True)
        try:
            directory.rmdir()
        except OSError:
            pass


@dataclass
class TagRecord:
    digest: str
    media_type: str
    size: int
    fetched: float
    public: bool


@dataclass
class TagStore:
    """The digest each tag last resolved to, for serving stale tags.

    Every revalidated pull updates its tag's time; the file is rewritten
    (with an fsync) only when the tag moved or its time is a minute old, so
    a busy tag does not cost a disk flush per request."""

    root: Path
    _known: dict[Path, TagRecord] = field(default_factory=dict)

    def _path(self, registry: str, name: str, tag: str) -> Path:
        return self.root / "tags" / registry / name / f"{tag}.json"

    def get(self, registry: str, name: str, tag: str) -> TagRecord | None:
        path = self._path(registry, name, tag)
        known = self._known.get(path)
        if known is not None:
            return known
        try:
            record = TagRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        self._known[path] = record
        return record

    def records(self) -> Iterator[tuple[str, str, TagRecord]]:
        """Every (repository, tag, record), across registries."""
        for path in (self.root / "tags").glob("*/**/*.json"):
            relative = path.relative_to(self.root / "tags")
            name = "/".join(relative.parts[1:-1])
            try:
                record = TagRecord(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            yield name, path.name.removesuffix(".json"), record

    def put(self, registry: str, name: str, tag: str, record: TagRecord) -> None:
        old = self.get(registry, name, tag)
        if (
            old is not None
            and dataclasses.replace(old, fetched=record.fetched) == record
            and record.fetched - old.fetched < TAG_REFRESH_EVERY
        ):
            return  # unchanged and recent: keep the time on disk (errs stale-safe)
        path = self._path(registry, name, tag)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, json.dumps(asdict(record)).encode())
        self._known[path] = record


def _write_atomically(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    with temp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
