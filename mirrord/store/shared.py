"""One fill per digest across processes sharing a cache directory: the
lock a filling process holds, and what another process sees of it.

No Twisted here; every function blocks on the disk (the disk worker calls
them). A fill's temporary file is named by its digest
(``tmp/sha256-<hex>.fill``) and its process holds ``flock(LOCK_EX)`` on it
from before its upstream GET until the blob is linked into place and the
file unlinked. The kernel drops the lock when the process dies, so a held
lock always means a live filler. Beside it, ``<name>.json`` says what the
filler learned from the upstream's headers (media type, expected size).

A process that cannot take the lock follows the file (``Probe``): its size
is what is written so far; the blob is verified once ``blobs/.../data``
is linked to the very file it follows (the filler links it only after the
digest matched). A lock that is free while no blob is published, or a blob
published from another file, means the fill it followed ended without
one: the file's bytes are never trusted (the next claimer unlinks it).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

FILL_SUFFIX = ".fill"
ABOUT_SUFFIX = ".json"
# Taking a lock that races a filler's unlink is retried this many times.
CLAIM_ATTEMPTS = 5


def fill_path(tmp: Path, digest: str) -> Path:
    """The temporary file of ``digest``'s fill, the same in every process."""
    algorithm, hexdigest = digest.split(":", 1)
    return tmp / f"{algorithm}-{hexdigest}{FILL_SUFFIX}"


def about_path(fill: Path) -> Path:
    return fill.with_suffix(ABOUT_SUFFIX)


@dataclass
class Claim:
    """An open descriptor on a fill's file. ``locked``: this process holds
    the lock and fills; otherwise another process does and this one follows."""

    path: Path
    fd: int
    locked: bool

    def release(self) -> None:
        """Let go without a blob: remove the file (while locked, so nobody
        follows its bytes), then close (dropping the lock)."""
        if self.fd < 0:
            return
        if self.locked:
            self.path.unlink(missing_ok=True)
            about_path(self.path).unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = -1


class Published(Exception):
    """The blob is in the store already (another process published it)."""


def claim(tmp: Path, digest: str, published: Path) -> Claim:
    """Take ``digest``'s fill lock, or learn who holds it.

    Returns a locked ``Claim`` on a new, empty file, or an unlocked one
    (on the file a live process fills) when such a process holds the lock.
    A file a dead filler left is unlinked, never truncated in place: its
    followers must see that fill end (their descriptor's file is never
    published, see ``probe``), and the inode may be a just-evicted blob's
    that readers still serve. Raises ``Published`` when ``published`` (the
    blob's data file) exists, and ``OSError`` when the file cannot be made."""
    path = fill_path(tmp, digest)
    for _ in range(CLAIM_ATTEMPTS):
        if published.exists():
            raise Published(digest)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        except FileExistsError:
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue  # its filler unlinked it meanwhile: try again
            created = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise
            return Claim(path, fd, locked=False)
        if not same_file(fd, path):
            # The filler we raced unlinked it (done or failed): try again.
            os.close(fd)
            continue
        if published.exists():
            # Published while we opened it: the file may be the blob's own
            # inode (a filler killed between linking and unlinking).
            if not created:
                path.unlink(missing_ok=True)
            os.close(fd)
            raise Published(digest)
        if not created:
            # A dead filler's file: unlink it (under its lock, so nobody
            # takes it meanwhile) and make a new one on the next turn.
            path.unlink(missing_ok=True)
            about_path(path).unlink(missing_ok=True)
            os.close(fd)
            continue
        about_path(path).unlink(missing_ok=True)
        return Claim(path, fd, locked=True)
    raise OSError(errno.EBUSY, f"cannot take the fill lock of {digest}")


def describing_path(about: Path) -> Path:
    """The temporary name ``describe`` writes ``about`` under."""
    return about.with_name(f".{about.name}.{os.getpid()}")


def owner_of(temp: Path) -> Path:
    """The fill file whose lock says whether ``temp`` (a file in ``tmp/``)
    is in use: a fill's own file, its description, or the temporary file
    ``describe`` writes that description under (``.<description>.<pid>``)."""
    name = temp.name
    if name.startswith(".") and ABOUT_SUFFIX + "." in name:
        name = name[1:].rsplit(ABOUT_SUFFIX + ".", 1)[0] + ABOUT_SUFFIX
    if name.endswith(ABOUT_SUFFIX):
        return temp.with_name(name).with_suffix(FILL_SUFFIX)
    return temp


def describe(claim: Claim, about: dict) -> None:
    """Tell followers what the upstream said (media type, size...)."""
    about_file = about_path(claim.path)
    temp = describing_path(about_file)
    temp.write_bytes(json.dumps(about).encode())
    os.replace(temp, about_file)


@dataclass
class Probe:
    """What a follower sees of another process's fill now."""

    # Bytes in the file; the blob's size once published.
    size: int
    # The filler's description (None until it wrote one).
    about: dict | None = None
    published: bool = False
    # The lock is free and nothing was published: the fill is over, failed.
    abandoned: bool = False


def probe(claim: Claim, published: Path, meta: Path) -> Probe:
    """Look at the fill ``claim`` follows (blocking, cheap: a few stats).

    Published means the blob's data is the very file ``claim`` has open
    (the filler linked it in place): a published blob on another inode
    (this fill was rejected or its filler died, and another process filled
    the digest since) says nothing of the bytes followed so far, so that
    fill counts as abandoned and its readers are cut."""
    seen = _published(published, meta, claim.fd)
    if seen is not None:
        return seen
    size = os.fstat(claim.fd).st_size
    about = None
    try:
        about = json.loads(about_path(claim.path).read_bytes())
    except (OSError, ValueError):
        pass
    try:
        fcntl.flock(claim.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return Probe(size, about)
        raise
    # Free: the filler finished, failed or died. Published in the meantime?
    fcntl.flock(claim.fd, fcntl.LOCK_UN)
    seen = _published(published, meta, claim.fd)
    return seen if seen is not None else Probe(size, about, abandoned=True)


def _published(data: Path, meta: Path, fd: int) -> Probe | None:
    try:
        stat = data.stat()
        about = json.loads(meta.read_bytes())
    except (OSError, ValueError):
        return None
    mine = os.fstat(fd)
    if (stat.st_dev, stat.st_ino) != (mine.st_dev, mine.st_ino):
        return Probe(mine.st_size, abandoned=True)
    return Probe(stat.st_size, {"meta": about, "size": stat.st_size}, published=True)


def is_held(path: Path) -> bool:
    """Whether a live process holds the lock of this temporary file (the
    restart scan must leave such a file alone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)
