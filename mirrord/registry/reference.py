"""What a ``/v2/`` path asks for, validated before anything goes upstream.

Names, tags and digests follow the distribution spec's grammar exactly; any
percent-encoding, ``..`` or stray character fails that grammar, so traversal
and encoded slashes are rejected here rather than handed to an upstream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from mirrord.registry import errors

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
DIGEST_RE = re.compile(r"(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})")
MAX_NAME_LENGTH = 255


class Kind(Enum):
    BASE = "base"
    MANIFEST = "manifests"
    BLOB = "blobs"
    TAGS = "tags"


@dataclass(frozen=True)
class Reference:
    """A parsed registry request: what kind, which repository, which object."""

    kind: Kind
    name: str = ""
    reference: str = ""

    @property
    def by_digest(self) -> bool:
        return ":" in self.reference

    def path(self, name: str | None = None) -> str:
        """The upstream path for this request, optionally under another name."""
        name = self.name if name is None else name
        if self.kind is Kind.BASE:
            return "/v2/"
        if self.kind is Kind.TAGS:
            return f"/v2/{name}/tags/list"
        return f"/v2/{name}/{self.kind.value}/{self.reference}"


def check_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name):
        raise errors.name_invalid(name)
    return name


def check_digest(digest: str) -> str:
    if not DIGEST_RE.fullmatch(digest):
        raise errors.digest_invalid(digest)
    return digest


def parse(path: str) -> Reference:
    """Parse the part of a path after ``/v2/`` into a ``Reference``.

    Raises ``RegistryError`` for anything that is not a well-formed pull
    request: the caller answers with it and never contacts an upstream.
    """
    if path == "":
        return Reference(Kind.BASE)
    parts = path.split("/")
    if len(parts) >= 3 and parts[-2:] == ["tags", "list"]:
        return Reference(Kind.TAGS, check_name("/".join(parts[:-2])))
    if len(parts) >= 3 and parts[-2] in ("manifests", "blobs"):
        name = check_name("/".join(parts[:-2]))
        kind = Kind(parts[-2])
        reference = parts[-1]
        if kind is Kind.BLOB or ":" in reference:
            check_digest(reference)
        elif not TAG_RE.fullmatch(reference):
            raise errors.tag_invalid(reference)
        return Reference(kind, name, reference)
    if "%" in path or ".." in parts:
        raise errors.name_invalid(path)
    raise errors.not_found(f"/v2/{path}")
