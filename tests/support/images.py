"""Test images, generated: small random layers written as OCI layouts.

Nothing is downloaded; every digest is computed here, so tests can check
that what a client received is exactly what was generated.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Layout:
    """An OCI layout on disk plus what the test needs to know about it."""

    path: Path
    tag: str
    manifest_digest: str = ""
    media_type: str = OCI_MANIFEST
    blobs: dict[str, bytes] = field(default_factory=dict)

    def blob_path(self, digest: str) -> Path:
        return self.path / "blobs" / "sha256" / digest.split(":", 1)[1]

    def add_blob(self, data: bytes) -> dict:
        digest = sha256(data)
        self.blobs[digest] = data
        target = self.blob_path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return {"digest": digest, "size": len(data)}


def _layer(size: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = os.urandom(size)
        info = tarfile.TarInfo("random.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _image(layout: Layout, arch: str, layer_sizes: tuple[int, ...]) -> dict:
    layers = []
    diff_ids = []
    for size in layer_sizes:
        data = _layer(size)
        diff_ids.append(sha256(data))
        layers.append({"mediaType": OCI_LAYER, **layout.add_blob(data)})
    config = json.dumps(
        {"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, **layout.add_blob(config)},
            "layers": layers,
        }
    ).encode()
    return {
        "mediaType": OCI_MANIFEST,
        **layout.add_blob(manifest),
        "platform": {"architecture": arch, "os": "linux"},
    }


def _write_index(layout: Layout, descriptor: dict) -> Layout:
    descriptor = dict(descriptor, annotations={"org.opencontainers.image.ref.name": layout.tag})
    descriptor.pop("platform", None)
    (layout.path / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "manifests": [descriptor]})
    )
    (layout.path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    layout.manifest_digest = descriptor["digest"]
    layout.media_type = descriptor["mediaType"]
    return layout


def single_arch(
    path: Path, tag: str = "latest", layer_sizes: tuple[int, ...] = (40_000, 90_000)
) -> Layout:
    layout = Layout(path, tag)
    return _write_index(layout, _image(layout, "amd64", layer_sizes))


def multi_arch(path: Path, tag: str = "latest") -> Layout:
    layout = Layout(path, tag)
    children = [_image(layout, arch, (30_000,)) for arch in ("amd64", "arm64")]
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}).encode()
    return _write_index(layout, {"mediaType": OCI_INDEX, **layout.add_blob(index)})
