"""Several registries behind one twistd mirrord, pulled with skopeo."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.conftest import Images, Skopeo, start_mirror, verify_dir_copy
from tests.e2e.test_pull import _raw_tls
from tests.support.pki import Pki


def test_host_prefix_mirror_path_and_ns(
    workdir: Path, pki: Pki, registry: str, skopeo: Skopeo, test_images: Images
) -> None:
    """ghcr.io (played by docker-registry) is reachable by host, by path prefix, through a
    registries.conf mirror with a path, and by ?ns=; an unserved registry is 404."""
    config = workdir / "routing.toml"
    config.write_text(
        f'[registries."docker.io"]\nupstreams = ["{registry}"]\n'
        f'[registries."ghcr.io"]\nupstreams = ["{registry}"]\nhosts = ["localhost"]\n'
    )
    mirror = start_mirror(workdir, pki, [], "routing", "--config", str(config))
    port = mirror.port
    digest = test_images.alpine.manifest_digest
    try:
        by_host = skopeo.inspect(f"localhost:{port}/owner/app:latest")
        assert json.loads(by_host.stdout)["Digest"] == digest
        by_prefix = skopeo.inspect(f"127.0.0.1:{port}/ghcr.io/owner/app:latest")
        assert json.loads(by_prefix.stdout)["Digest"] == digest

        conf = workdir / "registries-ghcr.conf"
        conf.write_text(
            "unqualified-search-registries = []\n"
            '[[registry]]\nprefix = "ghcr.io"\nlocation = "127.0.0.1:9"\n'
            f'[[registry.mirror]]\nlocation = "127.0.0.1:{port}/ghcr.io"\n'
        )
        dest = workdir / "copy-ghcr"
        skopeo.copy("ghcr.io/owner/app:latest", dest, conf=conf)
        assert verify_dir_copy(dest) == len(test_images.alpine.blobs) - 1

        request = b"GET /v2/owner/app/manifests/latest?ns=ghcr.io HTTP/1.1\r\nHost: x\r\n"
        accept = b"Accept: application/vnd.oci.image.manifest.v1+json\r\n"
        answer, _ = _raw_tls(mirror, pki, request + accept + b"Connection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
        assert f"Docker-Content-Digest: {digest}".encode() in answer

        request = b"GET /v2/x/manifests/latest?ns=quay.io HTTP/1.1\r\nHost: x\r\n"
        answer, _ = _raw_tls(mirror, pki, request + b"Connection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 404 "), answer[:300]
        assert b"NAME_UNKNOWN" in answer
        unknown = skopeo.inspect(f"127.0.0.1:{port}/quay.io/x:latest", check=False)
        assert unknown.returncode != 0
    finally:
        mirror.stop()
