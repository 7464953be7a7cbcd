"""Image references as people write them: ``library/alpine:3.20`` or
``library/alpine@sha256:<hex>``, checked against the distribution grammar
(pure: the configuration validates ``[cache] warm`` with it)."""

from __future__ import annotations

from dataclasses import dataclass

from mirrord.registry.reference import DIGEST_RE, MAX_NAME_LENGTH, NAME_RE, TAG_RE


@dataclass(frozen=True)
class Image:
    """A repository and a tag or digest: ``library/alpine:3.20``,
    ``library/alpine@sha256:...``."""

    name: str
    reference: str

    def __str__(self) -> str:
        separator = "@" if ":" in self.reference else ":"
        return f"{self.name}{separator}{self.reference}"


def parse_image(text: str) -> Image:
    """``name:tag`` or ``name@sha256:<hex>``; ``ValueError`` saying what is
    wrong otherwise. A name without a tag is not taken to mean ``latest``:
    what is warmed should be written down."""
    if "@" in text:
        name, _, reference = text.partition("@")
        if not DIGEST_RE.fullmatch(reference):
            raise ValueError(f"{text!r}: {reference!r} is not a digest like sha256:<64 hex>")
    else:
        name, colon, reference = text.rpartition(":")
        if not colon or "/" in reference:
            raise ValueError(f"{text!r}: needs a tag (name:tag) or a digest (name@sha256:...)")
        if not TAG_RE.fullmatch(reference):
            raise ValueError(f"{text!r}: {reference!r} is not a valid tag")
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name):
        raise ValueError(f"{text!r}: {name!r} is not a valid repository name")
    return Image(name, reference)
