"""The content-addressed store on disk: write while hashing, verify,
publish; an index of what is there, least recently used first; eviction.

No Twisted here. The blocking parts a fill needs (``TempBlob``'s writes,
``BlobStore.commit``) run on the disk worker (``mirrord.store.worker``); the
index (``BlobStore.add``, ``evict``) is the reactor's. Layout under the
cache root (as distribution lays it out)::

    blobs/sha256/ab/<hex>/data       the bytes, verified against <hex>
    blobs/sha256/ab/<hex>/meta.json  media type, repository, whether public
    tags/<registry>/<repository>/<tag>.json   the digest a tag last had
    tmp/                             fills in progress, each file locked by
                                     its process; the unlocked ones are
                                     removed at startup
    index.sqlite                     what every process using the directory
                                     counts on (``mirrord.store.index``)

A blob becomes visible only after its length and digest match (temporary
file, fsync, link into place), so unverified bytes never become a hit.
Several processes may share the directory (``share``): fills are made once
across them (``mirrord.store.shared``), and the size limit, eviction and
pins go through the shared index on the disk worker.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from mirrord.store import shared
from mirrord.store.index import SharedIndex, pinned_repository
from mirrord.store.shared import Claim

log = Logger()


class DigestMismatch(Exception):
    """The bytes did not hash to the digest they were fetched for."""


class StoreUnavailable(OSError):
    """The cache cannot take a new blob now: no space, no free file
    descriptor, a read-only or broken disk. Raised before anything is
    written, so the caller can serve the client without caching; ``errno``
    and ``strerror`` say why (``ENOSPC``, ``EMFILE``, ``ENFILE``...)."""


def matches(digest: str, hexdigest: str, size: int, expected_size: int | None) -> bool:
    """Whether bytes of ``size`` hashing to ``hexdigest`` are the blob ``digest``."""
    return hexdigest == digest.split(":", 1)[1] and expected_size in (None, size)


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
# Seconds between two batches of hits sent to the shared index.
TOUCHES_EVERY = 30.0
# Seconds the shared index's figures (size, blobs) shown by /metrics and the
# status page may be old: each worker reads them from SQLite at most this often.
FIGURES_EVERY = 5.0


class TempBlob:
    """A blob being written to a temporary file. Its hash is the caller's
    (see ``mirrord.store.worker``): publishing needs the hex digest. Every
    method blocks on the disk; a fill calls them from the disk worker, and
    only from there, so its descriptor is never closed under a write.

    The file stays open, under ``flock``, until ``discard`` (after the blob
    is linked into place): another process's restart scan leaves a locked
    file alone, and a fill's lock (``claim``, ``mirrord.store.shared``)
    tells other processes the fill is alive."""

    def __init__(self, path: Path, claim: Claim | None = None) -> None:
        self.path = path
        self.claim = claim
        self._fd = claim.fd if claim is not None else _locked_new(path)
        self.size = 0
        self._synced = 0
        self.closed = False
        self._flushed = False

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self.size += len(data)
        if self.size - self._synced >= WRITEBACK_EVERY:
            _start_writeback(self._fd, self._synced, self.size - self._synced)
            self._synced = self.size

    def finish(self) -> None:
        """Flush to the disk; the file stays open (and locked) until ``discard``."""
        if self.closed or self._flushed:
            return
        os.fsync(self._fd)
        self._flushed = True

    def discard(self) -> None:
        """Remove the temporary name, then close: the lock goes last, so no
        other process takes over a file about to disappear."""
        if self.closed:
            return
        self.path.unlink(missing_ok=True)
        if self.claim is not None:
            self.claim.fd = -1
            shared.about_path(self.path).unlink(missing_ok=True)
        os.close(self._fd)
        self.closed = True


def _admin_pins(root: Path) -> tuple[str, ...]:
    """The pins an admin set (``pins.json``, see ``mirrord.store.inventory``)."""
    try:
        pins = json.loads((root / "pins.json").read_text())
    except (OSError, ValueError):
        return ()
    return tuple(p for p in pins if isinstance(p, str)) if isinstance(pins, list) else ()


def _locked_new(path: Path) -> int:
    """A new file at ``path``, open and locked. Another process's restart
    scan may remove it between the open and the lock: then it is made again,
    so the file this returns is the one at ``path``, and locked."""
    for _ in range(shared.CLAIM_ATTEMPTS):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if shared.same_file(fd, path):
            return fd
        os.close(fd)
    raise OSError(errno.EBUSY, f"{path} keeps disappearing")


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
    # The tags, for pins like ``library/alpine:3.*``: the one TagStore every
    # registry's backend writes through, so its index is current.
    tags: TagStore = field(init=False)
    _pins: set[str] | None = field(default=None, init=False)
    _pins_version: int = field(default=-1, init=False)
    _pins_missing: set[str] = field(default_factory=set, init=False)
    # Several processes may use the directory: the size limit, eviction and
    # pins go through the index they share (``mirrord.store.index``), on the
    # disk worker (``offload(f, *args)`` runs f there, returning a Deferred).
    share: bool = False
    offload: Callable[..., Any] | None = None
    shared: SharedIndex | None = field(default=None, init=False)
    _touched: dict[str, float] = field(default_factory=dict, init=False)
    _touches_sent: float = field(default=0.0, init=False)
    _evicting: bool = field(default=False, init=False)
    _figures: tuple[int, int] | None = field(default=None, init=False)
    _figures_read: float = field(default=float("-inf"), init=False)
    _figures_reading: bool = field(default=False, init=False)
    # Blobs linked in place whose record in the shared index failed (it was
    # locked past its busy timeout): digest -> (size, when, repository),
    # recorded again by the disk worker (``record_pending``), never lost.
    _unrecorded: dict[str, tuple[int, float, str]] = field(default_factory=dict, init=False)
    _unrecorded_lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _evict_again: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        (self.root / "blobs").mkdir(exist_ok=True)
        self.tags = TagStore(self.root)
        if self.share:
            self.shared = SharedIndex(self.root)

    def blob_dir(self, digest: str) -> Path:
        algorithm, hexdigest = digest.split(":", 1)
        return self.root / "blobs" / algorithm / hexdigest[:2] / hexdigest

    def data_path(self, digest: str) -> Path:
        return self.blob_dir(digest) / "data"

    def rebuild(self) -> tuple[int, int]:
        """Index what is on disk; remove interrupted fills. Returns (entries, removed)."""
        removed = self.scan_temporary()
        self.entries.clear()
        self.size = 0
        self._pins = None
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
        if self.shared is not None:
            found = self.entries.values()
            self.shared.reconcile(
                [(e.digest, e.size, e.last_access, e.meta.repository) for e in found],
                lambda digest: self.data_path(digest).exists(),
            )
            self.size = self.shared.total()
            self._figures = self.shared.figures()
            self._figures_read = self.now()
        return len(self.entries), removed

    def _read_figures(self) -> tuple[int, int]:
        assert self.shared is not None
        self.record_pending()
        return self.shared.figures()

    def record_pending(self) -> None:
        """Record the blobs whose record failed before (blocks; the disk
        worker's). What fails again stays pending."""
        assert self.shared is not None
        with self._unrecorded_lock:
            pending, self._unrecorded = self._unrecorded, {}
        for digest, (size, when, repository) in pending.items():
            if not self.data_path(digest).exists():
                continue  # evicted meanwhile: nothing to count
            self._record(digest, size, when, repository)

    def _record(self, digest: str, size: int, when: float, repository: str) -> None:
        assert self.shared is not None
        try:
            self.shared.put(digest, size, when, repository)
        except sqlite3.Error as e:
            log.warn(
                "{digest} is in place but not yet counted in the shared index ({error});"
                " recorded later",
                digest=digest,
                error=str(e),
            )
            with self._unrecorded_lock:
                self._unrecorded[digest] = (size, when, repository)

    def figures(self) -> tuple[int, int]:
        """(bytes, blobs) in the cache, as /metrics and the status page show
        them. With several processes: the shared index's, the same in every
        worker, read on the disk worker at most every ``FIGURES_EVERY``
        seconds (this returns the last reading, never waits for SQLite)."""
        if self.shared is None or self.offload is None:
            return self.size, len(self.entries)
        now = self.now()
        if now - self._figures_read >= FIGURES_EVERY and not self._figures_reading:
            self._figures_reading = True

            def read(figures: tuple[int, int]) -> None:
                self._figures, self._figures_read = figures, self.now()

            def done(_: object) -> None:
                self._figures_reading = False

            reading = self.offload(self._read_figures)
            reading.addCallback(read).addErrback(lambda _: None).addBoth(done)
        if self._figures is None:
            return self.size, len(self.entries)
        return self._figures

    def scan_temporary(self) -> int:
        """Remove what interrupted fills left in ``tmp/``, except the files
        of fills a live process holds (another daemon sharing the cache):
        their lock says so. Returns how many files went."""
        removed = 0
        for temp in (self.root / "tmp").iterdir():
            if shared.is_held(shared.owner_of(temp)):
                continue
            temp.unlink(missing_ok=True)
            removed += 1
        return removed

    def claim(self, digest: str) -> Claim:
        """Take ``digest``'s fill lock across processes (blocks; see
        ``mirrord.store.shared.claim``)."""
        return shared.claim(self.root / "tmp", digest, self.data_path(digest))

    def probe(self, claim: Claim) -> shared.Probe:
        """Another process's fill of the blob ``claim`` follows (blocks)."""
        digest = claim.path.name.removesuffix(shared.FILL_SUFFIX).replace("-", ":", 1)
        return shared.probe(claim, self.data_path(digest), self.blob_dir(digest) / "meta.json")

    def find(self, digest: str) -> Entry | None:
        """A blob on disk that this process has not indexed (another process
        published it): its entry, or None (blocks; the disk worker's)."""
        data = self.data_path(digest)
        try:
            stat = data.stat()
            meta = Meta(**json.loads((data.parent / "meta.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if self.shared is not None:
            self.shared.ensure(digest, stat.st_size, stat.st_mtime, meta.repository)
        return Entry(digest, stat.st_size, meta, self.now())

    def adopt(self, entry: Entry) -> Entry:
        """Index a blob ``find`` saw (the reactor's), unless already known."""
        known = self.entries.get(entry.digest)
        if known is not None:
            return known
        return self.add(entry.digest, entry.size, entry.meta, entry.last_access)

    def new_temp(self, size: int | None = None, claim: Claim | None = None) -> TempBlob:
        """A new temporary file for a blob of ``size`` bytes (if known), or
        ``StoreUnavailable`` before anything is written: no free descriptor,
        or a disk without room for it (a write failing mid-fill is the
        alternative, after the client had its headers)."""
        directory = self.root / "tmp"
        try:
            if size is not None:
                stat = os.statvfs(directory)
                if stat.f_bavail * stat.f_frsize < size:
                    raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} for {size} bytes")
            if claim is not None:
                return TempBlob(claim.path, claim)
            return TempBlob(directory / uuid.uuid4().hex)
        except OSError as e:
            raise StoreUnavailable(e.errno, f"cannot create a cache file: {e.strerror}") from e

    def commit(self, temp: TempBlob, digest: str, meta: bytes, when: float) -> None:
        """Make a verified temp file the blob ``digest``: fsync, write its
        metadata, link it into place. Blocks on the disk (the disk worker
        calls it). The temp file keeps its name, for readers about to open
        it, until the caller removes it after ``add``."""
        temp.finish()
        directory = self.blob_dir(digest)
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(directory / "meta.json", meta)
        os.utime(temp.path, (when, when))
        # A hard link under a unique name, renamed over any older copy: the
        # data appears whole, at once, and the temp name still works.
        staged = directory / f".data.{uuid.uuid4().hex}"
        os.link(temp.path, staged)
        os.replace(staged, directory / "data")
        if self.shared is not None:
            # The blob is in place: a failed record must not fail the fill.
            if self._unrecorded:
                self.record_pending()
            repository = json.loads(meta).get("repository", "")
            self._record(digest, temp.size, when, repository)

    def add(self, digest: str, size: int, meta: Meta, when: float) -> Entry:
        """Index a blob ``commit`` put in place (the reactor's bookkeeping)."""
        previous = self.entries.get(digest)
        if previous is not None:
            self.size -= previous.size
        entry = Entry(digest, size, meta, when)
        if previous is not None:
            entry.readers = previous.readers
        self.entries[digest] = entry
        self.size += entry.size
        if digest in self._pins_missing:
            self._pins = None  # a pinned manifest arrived: its children are pinned too
        return entry

    def write_meta(self, digest: str, meta: bytes) -> None:
        """Replace a blob's ``meta.json`` (blocks on an fsync)."""
        _write_atomically(self.blob_dir(digest) / "meta.json", meta)

    def put_bytes(self, digest: str, data: bytes, meta: Meta) -> Entry:
        """Store a small blob at once, blocking (see ``mirrord.store.worker.put_bytes``
        for the same off the reactor)."""
        now = self.now()
        self.write_bytes(digest, data, json.dumps(asdict(meta)).encode(), now)
        return self.add(digest, len(data), meta, now)

    def write_bytes(self, digest: str, data: bytes, meta: bytes, when: float) -> None:
        """The disk half of ``put_bytes``: verify, write, fsync, link into
        place. Blocks; ``add`` indexes the blob afterwards."""
        algorithm, expected = digest.split(":", 1)
        hexdigest = hashlib.new(algorithm, data).hexdigest()
        if hexdigest != expected:
            raise DigestMismatch(f"{digest}: {len(data)} bytes hashing to {hexdigest[:16]}...")
        temp = self.new_temp(len(data))
        try:
            temp.write(data)
            self.commit(temp, digest, meta, when)
        finally:
            temp.discard()

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
        if self.shared is not None:
            self._touched[digest] = now
            if now - self._touches_sent > TOUCHES_EVERY:
                self._send_touches(now)
        return entry

    def _send_touches(self, now: float) -> None:
        """This process's hits, to the shared index (batched: one worker
        job a ``TOUCHES_EVERY``), so another process's eviction sees them."""
        if self.offload is None or self.shared is None:
            return
        touched, self._touched = self._touched, {}
        self._touches_sent = now
        self.offload(self.shared.touch, touched).addErrback(lambda _: None)

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
        manifest, and what that manifest references, recursively.

        Computed from the tags' index in memory (read from disk once) and
        kept until a tag moves or a pinned manifest not yet cached
        arrives: eviction runs after every publication past the high
        watermark, and must not re-read every tag and manifest each time."""
        patterns = [p for p in self.pinned if ":" in p]
        if not patterns:
            return set()
        if self._pins is not None and self._pins_version == self.tags.version:
            return self._pins
        keep: set[str] = set()
        self._pins_missing = set()
        for name, tag, record in self.tags.records():
            if any(fnmatch.fnmatchcase(f"{name}:{tag}", p) for p in patterns):
                self._referenced(record.digest, keep)
        self._pins, self._pins_version = keep, self.tags.version
        return keep

    def _referenced(self, digest: str, keep: set[str]) -> None:
        if digest in keep:
            return
        keep.add(digest)
        entry = self.entries.get(digest)
        if entry is None:
            self._pins_missing.add(digest)
            return
        if entry.size > 4 << 20 or "json" not in entry.meta.media_type:
            return
        try:
            document = json.loads(self.data_path(digest).read_bytes())
        except (OSError, ValueError):
            self._pins_missing.add(digest)
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
        under the low one. Blobs being read and pinned blobs stay.

        With a shared index the total is every process's, and the work is
        the disk worker's: the blobs removed are returned only when it ran
        at once (an inline worker); the index follows when it is done."""
        if self.shared is not None and self.offload is not None:
            return self._evict_shared()
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
        # A tag record is only ever served with its manifest: it goes with
        # it, so the tags kept (on disk and in memory) are bounded by the
        # cache too.
        self.tags.forget_digests(set(removed))
        return removed

    def _evict_shared(self) -> list[str]:
        if self._evicting:
            self._evict_again = True
            return []
        assert self.shared is not None and self.offload is not None
        self._evicting = True
        busy = {digest for digest, entry in self.entries.items() if entry.readers}
        keep = busy | self.pinned_by_tag()
        configured = self.pinned
        touched, self._touched = self._touched, {}
        shared = self.shared

        def evict() -> tuple[list[str], int]:
            # On the disk worker: the pins an admin set through any process
            # (pins.json), and tags pinned by patterns as every process wrote
            # them (this process's own index may not know them all).
            patterns = (*configured, *_admin_pins(self.root))
            pinned = pinned_repository(patterns)
            kept = keep | self.tag_pins_on_disk([p for p in patterns if ":" in p])
            return shared.evict(
                self.max_size,
                self.high_watermark,
                self.low_watermark,
                lambda digest, repository: digest in kept or pinned(repository),
                self._unlink_blob,
                touched,
            )

        result: list[str] = []

        def evicted(outcome: tuple[list[str], int]) -> None:
            removed, total = outcome
            for digest in removed:
                entry = self.entries.get(digest)
                if entry is not None:
                    self._forget(entry)
            self.size = total
            self.tags.forget_digests(set(removed))
            result.extend(removed)

        def done(_: object) -> None:
            self._evicting = False
            if self._evict_again:
                self._evict_again = False
                self.evict()

        self.offload(evict).addCallback(evicted).addBoth(done)
        return result

    def tag_pins_on_disk(self, patterns: list[str]) -> set[str]:
        """Everything tags matching ``patterns`` need, read from the tag
        files and manifests on disk (blocking): what any process recorded."""
        if not patterns:
            return set()
        keep: set[str] = set()
        for path in (self.root / "tags").glob("*/**/*.json"):
            relative = path.relative_to(self.root / "tags")
            name = "/".join(relative.parts[1:-1])
            tag = path.name.removesuffix(".json")
            if not any(fnmatch.fnmatchcase(f"{name}:{tag}", p) for p in patterns):
                continue
            record = _read_tag(path)
            if record is not None:
                self._referenced_on_disk(record.digest, keep)
        return keep

    def _referenced_on_disk(self, digest: str, keep: set[str]) -> None:
        stack = [digest]
        while stack:
            digest = stack.pop()
            if digest in keep:
                continue
            keep.add(digest)
            try:
                data = self.data_path(digest)
                if data.stat().st_size > 4 << 20:
                    continue
                meta = json.loads((data.parent / "meta.json").read_text())
                if "json" not in meta.get("media_type", ""):
                    continue
                document = json.loads(data.read_bytes())
            except (OSError, ValueError, AttributeError):
                continue
            if not isinstance(document, dict):
                continue
            for child in [
                document.get("config"),
                *document.get("layers", []),
                *document.get("manifests", []),
            ]:
                if isinstance(child, dict) and isinstance(child.get("digest"), str):
                    stack.append(child["digest"])

    def forget(self, digest: str) -> bool:
        """Drop a blob from the index (an admin's delete), unless a client
        is reading it; its files are the caller's to remove (``remove_files``,
        blocking). Whether it was dropped."""
        entry = self.entries.get(digest)
        if entry is None or entry.readers:
            return False
        self._forget(entry)
        self._pins = None
        return True

    def remove_files(self, digest: str) -> None:
        """A blob's files, gone (blocks on the disk)."""
        self._remove_files(digest)

    def set_pins(self, patterns: tuple[str, ...]) -> None:
        """Replace the pin patterns (the config's plus an admin's)."""
        self.pinned = patterns
        self._pins = None

    def _forget(self, entry: Entry) -> None:
        if self.entries.pop(entry.digest, None) is not None:
            self.size -= entry.size

    def _remove_files(self, digest: str) -> None:
        self._unlink_blob(digest)
        if self.shared is not None:
            self.shared.remove(digest)

    def _unlink_blob(self, digest: str) -> None:
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
    # Records read or written so far; every tag on disk once ``_complete``.
    _known: dict[Path, TagRecord] = field(default_factory=dict)
    _complete: bool = False
    # Changes whenever a tag is added or points to another digest.
    version: int = 0

    def _path(self, registry: str, name: str, tag: str) -> Path:
        return self.root / "tags" / registry / name / f"{tag}.json"

    def get(self, registry: str, name: str, tag: str) -> TagRecord | None:
        path = self._path(registry, name, tag)
        known = self._known.get(path)
        if known is not None or self._complete:
            return known
        record = _read_tag(path)
        if record is not None:
            self._known[path] = record
        return record

    def read(self, registry: str, name: str, tag: str) -> TagRecord | None:
        """The tag's record as on disk now, written by any process (blocks;
        the index is not changed: ``learn`` does that, on the reactor)."""
        return _read_tag(self._path(registry, name, tag))

    def learn(self, registry: str, name: str, tag: str, record: TagRecord) -> None:
        """Take a record ``read`` found (another process may have written it)."""
        path = self._path(registry, name, tag)
        old = self._known.get(path)
        if old is not None and old.fetched >= record.fetched:
            return
        self._known[path] = record
        if old is None or old.digest != record.digest:
            self.version += 1

    def records(self) -> Iterator[tuple[str, str, TagRecord]]:
        """Every (repository, tag, record), across registries: read from
        disk the first time, from memory after."""
        if not self._complete:
            for path in (self.root / "tags").glob("*/**/*.json"):
                if path not in self._known and (record := _read_tag(path)) is not None:
                    self._known[path] = record
            self._complete = True
        for path, record in list(self._known.items()):
            relative = path.relative_to(self.root / "tags")
            name = "/".join(relative.parts[1:-1])
            yield name, path.name.removesuffix(".json"), record

    def forget_digests(self, digests: set[str]) -> None:
        """Drop the records of tags that point to any of ``digests``."""
        if not digests:
            return
        for path, record in list(self._known.items()):
            if record.digest in digests:
                del self._known[path]
                path.unlink(missing_ok=True)
                self.version += 1

    def all(self) -> list[tuple[str, str, str, TagRecord]]:
        """Every (registry, repository, tag, record)."""
        list(self.records())  # reads the disk the first time
        found = []
        for path, record in list(self._known.items()):
            parts = path.relative_to(self.root / "tags").parts
            found.append((parts[0], "/".join(parts[1:-1]), path.name.removesuffix(".json"), record))
        return found

    def forget(self, registry: str, name: str, tag: str) -> Path:
        """Drop a tag from the index; returns its file, for the caller to
        remove (blocking)."""
        path = self._path(registry, name, tag)
        if self._known.pop(path, None) is not None:
            self.version += 1
        return path

    def put(self, registry: str, name: str, tag: str, record: TagRecord) -> None:
        """Record a tag now, blocking on the disk (see ``prepare``)."""
        job = self.prepare(registry, name, tag, record)
        if job is not None:
            write_tag_file(*job)

    def prepare(
        self, registry: str, name: str, tag: str, record: TagRecord
    ) -> tuple[Path, bytes] | None:
        """Update the index with a tag's record; return the file to write
        (path, bytes) for the disk worker, or ``None`` when the file on disk
        may stay as it is."""
        old = self.get(registry, name, tag)
        if (
            old is not None
            and dataclasses.replace(old, fetched=record.fetched) == record
            and record.fetched - old.fetched < TAG_REFRESH_EVERY
        ):
            return None  # unchanged and recent: keep the time on disk (errs stale-safe)
        path = self._path(registry, name, tag)
        self._known[path] = record
        if old is None or old.digest != record.digest:
            self.version += 1
        return path, json.dumps(asdict(record)).encode()


def _read_tag(path: Path) -> TagRecord | None:
    try:
        return TagRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_tag_file(path: Path, data: bytes) -> None:
    """A tag record's file, written whole (blocks on an fsync)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, data)


def _write_atomically(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    with temp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
