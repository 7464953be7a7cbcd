"""The mirror's own access controls against a real twistd and skopeo."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from mirrord.passwords import make_hash
from tests.e2e.conftest import Images, Skopeo, start_mirror
from tests.e2e.test_pull import _raw_tls
from tests.support.pki import Pki


def test_controls_refuse_while_permitted_pulls_work(
    workdir: Path, pki: Pki, registry: str, skopeo: Skopeo, test_images: Images
) -> None:
    """Blocked agent, denied repository and the connection limit each refuse; skopeo still pulls."""
    config = workdir / "guard.toml"
    config.write_text(
        '[access]\nblock_user_agents = ["^curl/"]\nmax_connections_per_client = 2\n'
        f'[registries."docker.io"]\nupstreams = ["{registry}"]\ndeny = ["library/multi"]\n'
    )
    mirror = start_mirror(workdir, pki, [], "guard", "--config", str(config))
    try:
        allowed = skopeo.inspect(f"{mirror.address}/library/alpine:latest")
        assert json.loads(allowed.stdout)["Digest"] == test_images.alpine.manifest_digest
        denied = skopeo.inspect(f"{mirror.address}/library/multi:latest", check=False)
        assert denied.returncode != 0
        assert "denied" in denied.stderr.lower()

        blocked, _ = _raw_tls(
            mirror,
            pki,
            b"GET /v2/ HTTP/1.1\r\nHost: x\r\nUser-Agent: curl/8.0\r\nConnection: close\r\n\r\n",
        )
        assert blocked.startswith(b"HTTP/1.1 403 ") and b"DENIED" in blocked

        context = mirror.tls_context(pki)
        held = []
        for _ in range(2):
            raw = socket.create_connection(("127.0.0.1", mirror.port), timeout=10)
            held.append(context.wrap_socket(raw, server_hostname="127.0.0.1"))
        try:
            over, _ = _raw_tls(
                mirror, pki, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert over.startswith(b"HTTP/1.1 429 "), over[:200]
            assert b"Retry-After: 10" in over and b"TOOMANYREQUESTS" in over
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 5  # let the daemon see those connections go
        probe = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        while time.monotonic() < deadline and not _raw_tls(mirror, pki, probe)[0].startswith(
            b"HTTP/1.1 200"
        ):
            time.sleep(0.1)
        again = skopeo.inspect(f"{mirror.address}/library/alpine:latest")
        assert json.loads(again.stdout)["Digest"] == test_images.alpine.manifest_digest
    finally:
        mirror.stop()


def test_mirror_login_with_skopeo(
    workdir: Path, pki: Pki, registry: str, skopeo: Skopeo, test_images: Images
) -> None:
    """With [access.users] skopeo needs --creds; wrong or missing credentials are refused."""
    config = workdir / "login.toml"
    config.write_text(
        f'[access.users]\nops = "{make_hash("s3cret")}"\n'
        f'[registries."docker.io"]\nupstreams = ["{registry}"]\n'
    )
    mirror = start_mirror(workdir, pki, [], "login", "--config", str(config))
    ref = f"{mirror.address}/library/alpine:latest"
    try:
        for extra in ((), ("--creds", "ops:wrong")):
            refused = skopeo.inspect(ref, *extra, check=False)
            assert refused.returncode != 0
            assert "unauthorized" in refused.stderr.lower()
        allowed = skopeo.inspect(ref, "--creds", "ops:s3cret")
        assert json.loads(allowed.stdout)["Digest"] == test_images.alpine.manifest_digest
    finally:
        mirror.stop()
