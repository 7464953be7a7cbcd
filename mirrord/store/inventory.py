"""What the cache holds, by image, and what deleting one frees: the
admin's view of a ``BlobStore`` (``mirrord.admin``, ``mirrord.daemon.admin``).

No Twisted here. Planning reads small manifests from disk, so the daemon
runs it on a worker thread against a ``View`` (a snapshot of the index
taken on the reactor); applying a plan changes the index (the reactor's)
and then removes files (blocking, a worker thread's). A stopped daemon's
state directory is opened the same way, all on one thread.

A blob is deleted only when no manifest left in the cache references it,
so a layer shared by two images stays when one of them goes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mirrord.store.disk import BlobStore, Entry, TagRecord

MANIFEST_LIMIT = 4 << 20
PINS_FILE = "pins.json"


@dataclass
class View:
    """A snapshot of the store's index: blobs by digest, and tags as
    (registry, repository, tag, record)."""

    entries: dict[str, Entry]
    tags: list[tuple[str, str, str, TagRecord]]
    data_path: Callable[[str], Path]

    @classmethod
    def of(cls, store: BlobStore) -> View:
        return cls(dict(store.entries), store.tags.all(), store.data_path)


@dataclass
class Plan:
    """What a delete removes: tag files and blobs (digest -> size)."""

    tags: list[tuple[str, str, str]] = field(default_factory=list)
    blobs: dict[str, int] = field(default_factory=dict)

    def describe(self) -> dict:
        return {
            "tags": [f"{registry}/{name}:{tag}" for registry, name, tag in self.tags],
            "blobs": sorted(self.blobs),
            "bytes": sum(self.blobs.values()),
        }


def is_manifest(entry: Entry) -> bool:
    """Whether a blob may be a manifest (one that references others)."""
    return "json" in entry.meta.media_type and entry.size <= MANIFEST_LIMIT


def children(view: View, digest: str) -> list[str]:
    """The digests a cached manifest references (config, layers, the
    manifests of an index); none for a layer or a blob not cached."""
    entry = view.entries.get(digest)
    if entry is None or not is_manifest(entry):
        return []
    try:
        document = json.loads(view.data_path(digest).read_bytes())
    except (OSError, ValueError):
        return []
    if not isinstance(document, dict):
        return []
    found = []
    for child in [
        document.get("config"),
        *document.get("layers", []),
        *document.get("manifests", []),
    ]:
        if isinstance(child, dict) and isinstance(child.get("digest"), str):
            found.append(child["digest"])
    return found


def closure(
    view: View, roots: Iterable[str], cache: dict[str, list[str]] | None = None
) -> set[str]:
    """The roots and everything they reference, recursively."""
    cache = {} if cache is None else cache
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        digest = stack.pop()
        if digest in seen:
            continue
        seen.add(digest)
        if digest not in cache:
            cache[digest] = children(view, digest)
        stack.extend(cache[digest])
    return seen


def _summary(view: View, digests: set[str]) -> dict:
    cached = [view.entries[d] for d in digests if d in view.entries]
    return {
        "size": sum(e.size for e in cached),
        "blobs": len(cached),
        "missing": len(digests) - len(cached),
        "last_access": max((e.last_access for e in cached), default=0.0),
    }


def listing(view: View) -> list[dict]:
    """Every cached repository with its tags: each tag's digest, the bytes
    and blob count of its image (what is cached of it), its last access."""
    cache: dict[str, list[str]] = {}
    repositories: dict[tuple[str, str], dict] = {}
    for registry, name, tag, record in sorted(view.tags, key=lambda t: t[:3]):
        image = closure(view, [record.digest], cache)
        repo = repositories.setdefault(
            (registry, name),
            {"registry": registry, "repository": name, "tags": [], "digests": set()},
        )
        repo["digests"] |= image
        repo["tags"].append(
            {
                "tag": tag,
                "digest": record.digest,
                "fetched": record.fetched,
                **_summary(view, image),
            }
        )
    # Manifests fetched by digest only, and layers of unfinished pulls,
    # belong to their repository too (a repository without tags left shows
    # with its blobs alone).
    by_name = {name: key for key in repositories for (_, name) in [key]}
    for entry in view.entries.values():
        key = (entry.meta.registry, entry.meta.repository)
        if key not in repositories:
            key = by_name.get(entry.meta.repository, key)
        repo = repositories.setdefault(
            key, {"registry": key[0], "repository": key[1], "tags": [], "digests": set()}
        )
        repo["digests"].add(entry.digest)
    result = []
    for key in sorted(repositories):
        repo = repositories[key]
        digests = repo.pop("digests")
        result.append({**repo, **_summary(view, digests)})
    return result


@dataclass(frozen=True)
class Target:
    """``[registry/]name[:tag|@digest]`` as an admin types it."""

    name: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Target:
        if "@" in text:
            name, digest = text.rsplit("@", 1)
            if ":" not in digest:
                raise ValueError(f"{text!r}: a digest is algorithm:hex")
            return cls(name, digest=digest)
        name, _, tag = text.rpartition(":")
        if name and "/" not in tag:
            return cls(name, tag=tag)
        return cls(text)


def _matching(view: View, target: Target) -> list[tuple[str, str, str, TagRecord]]:
    """The tags a target names; ``docker.io/library/alpine`` and
    ``library/alpine`` both find the tag files under ``docker.io``."""
    found = []
    for registry, name, tag, record in view.tags:
        if target.name not in (name, f"{registry}/{name}"):
            continue
        if target.tag is not None and tag != target.tag:
            continue
        if target.digest is not None and record.digest != target.digest:
            continue
        found.append((registry, name, tag, record))
    return found


def _repository_of(view: View, target: Target) -> set[str]:
    return {
        e.digest
        for e in view.entries.values()
        if target.name in (e.meta.repository, f"{e.meta.registry}/{e.meta.repository}")
    }


def show(view: View, target: Target) -> dict:
    """One image's manifests and blobs: each digest with media type and size."""
    tags = _matching(view, target)
    roots = {record.digest for *_, record in tags}
    if target.digest is not None:
        roots.add(target.digest)
    if not roots:
        raise LookupError(f"{_text(target)} is not cached")
    cache: dict[str, list[str]] = {}
    image = closure(view, roots, cache)
    summary = _summary(view, image)
    manifests, blobs = [], []
    for digest in sorted(image):
        entry = view.entries.get(digest)
        row = {
            "digest": digest,
            "media_type": entry.meta.media_type if entry else None,
            "size": entry.size if entry else None,
            "cached": entry is not None,
            "last_access": entry.last_access if entry else None,
        }
        (manifests if cache.get(digest) or digest in roots else blobs).append(row)
    return {
        "tags": [f"{registry}/{name}:{tag}" for registry, name, tag, _ in tags],
        "manifests": manifests,
        "blobs": blobs,
        "size": summary["size"],
        "cached": summary["blobs"],
        "missing": summary["missing"],
        "last_access": summary["last_access"],
    }


def _text(target: Target) -> str:
    if target.tag:
        return f"{target.name}:{target.tag}"
    if target.digest:
        return f"{target.name}@{target.digest}"
    return target.name


def plan_delete(view: View, target: Target) -> Plan:
    """The tags a target names and the blobs only they reference: a tag,
    an image by digest (and the tags pointing at it), or a whole repository
    (with its manifests fetched by digest and layers of unfinished pulls)."""
    tags = _matching(view, target)
    roots = {record.digest for *_, record in tags}
    if target.digest is not None:
        roots.add(target.digest)
    if target.tag is None and target.digest is None:
        roots |= _repository_of(view, target)
    if not roots:
        raise LookupError(f"{_text(target)} is not cached")
    cache: dict[str, list[str]] = {}
    doomed = closure(view, roots, cache)
    gone = {(registry, name, tag) for registry, name, tag, _ in tags}
    kept_roots = [
        r.digest for registry, name, tag, r in view.tags if (registry, name, tag) not in gone
    ]
    kept_roots += [
        e.digest for e in view.entries.values() if e.digest not in doomed and is_manifest(e)
    ]
    keep = closure(view, kept_roots, cache)
    blobs = {d: view.entries[d].size for d in doomed - keep if d in view.entries}
    return Plan(sorted(gone), blobs)


def apply_index(store: BlobStore, plan: Plan) -> tuple[list[Path], list[str], list[str]]:
    """The index half of a delete (the reactor's): tags and blobs leave the
    index at once, so nothing new is served from them. Returns the tag files
    and blobs whose files to remove, and the blobs kept because a client
    is reading them now (a later delete or eviction takes them)."""
    tag_files = [store.tags.forget(*tag) for tag in plan.tags]
    removed, busy = [], []
    for digest in plan.blobs:
        (removed if store.forget(digest) else busy).append(digest)
    return tag_files, removed, busy


def remove_files(
    store: BlobStore,
    tag_files: list[Path],
    digests: list[str],
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> None:
    """The disk half of a delete (blocking): tag files, then blob files."""
    for path in tag_files:
        path.unlink(missing_ok=True)
        _prune_empty(path.parent, store.root / "tags")
    total = len(digests)
    for done, digest in enumerate(digests, 1):
        store.remove_files(digest)
        progress(done, total)


def _prune_empty(directory: Path, stop: Path) -> None:
    while directory != stop and stop in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def read_pins(root: Path) -> tuple[str, ...]:
    """The patterns an admin pinned (``cache/pins.json``), kept across restarts."""
    try:
        pins = json.loads((root / PINS_FILE).read_text())
    except (OSError, ValueError):
        return ()
    return tuple(p for p in pins if isinstance(p, str)) if isinstance(pins, list) else ()


def write_pins(root: Path, pins: Iterable[str]) -> None:
    """Replace the admin's pins, whole (blocks on an fsync)."""
    root.mkdir(parents=True, exist_ok=True)
    temp = root / f".{PINS_FILE}.{os.getpid()}"
    with temp.open("w") as f:
        json.dump(sorted(set(pins)), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, root / PINS_FILE)
