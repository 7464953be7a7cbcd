"""Pulling with skopeo through a real twistd mirrord in front of a real
docker-registry."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from tests.e2e.conftest import Images, Mirror, Skopeo, start_mirror, verify_dir_copy
from tests.support.pki import Pki
from tests.support.processes import DEAD_PORT, mirrord_argv, run, twistd


def test_installed_twistd_lists_and_documents_plugin() -> None:
    """After the README's install, twistd knows mirrord and documents every option."""
    listing = run([twistd(), "--help"]).stdout
    assert "mirrord" in listing
    usage = run([twistd(), "mirrord", "--help"]).stdout
    for option in ("--config", "--listen", "--cert", "--key", "--state-dir", "--upstream"):
        assert option in usage


def test_bad_config_stops_with_one_message(workdir: Path) -> None:
    """A config with an unknown key stops startup naming the key and file, no traceback."""
    bad = workdir / "bad.toml"
    bad.write_text("listen = [8443]\nupstrems = []\n")
    result = run(
        mirrord_argv("--config", str(bad)),
        check=False,
        timeout=30,
    )
    assert result.returncode != 0
    assert "unknown key 'upstrems'" in result.stderr + result.stdout
    assert str(bad) in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().count("\n") == 0, result.stderr  # one line
    assert "Usage:" not in result.stdout + result.stderr


def test_startup_problems_are_one_line(workdir: Path, registry_mirror: Mirror) -> None:
    """A missing certificate or a port in use stops startup with one line, no traceback."""
    base = mirrord_argv("--config", str(workdir / "empty.toml"))
    missing = run([*base, "--cert", "/nonexistent.pem", "--key", "/nonexistent.key"], check=False)
    assert missing.returncode != 0
    assert "mirrord: /nonexistent.pem: no such file" in missing.stderr
    busy = run(
        [
            *base,
            "--state-dir",
            str(workdir / "state-busy"),
            "--listen",
            f"tcp:{registry_mirror.port}:interface=127.0.0.1",
        ],
        check=False,
        timeout=30,
    )
    assert busy.returncode != 0
    output = busy.stdout + busy.stderr
    assert f"mirrord: cannot listen on 127.0.0.1:{registry_mirror.port}" in output
    assert "Traceback" not in output


def test_inspect_short_name(skopeo: Skopeo, registry_mirror: Mirror, test_images: Images) -> None:
    """`alpine` through the mirror is library/alpine upstream, digest intact."""
    result = skopeo.inspect(f"{registry_mirror.address}/alpine:latest")
    assert json.loads(result.stdout)["Digest"] == test_images.alpine.manifest_digest


def test_copy_by_tag_and_digest(
    skopeo: Skopeo, registry_mirror: Mirror, test_images: Images, workdir: Path
) -> None:
    """Copies by tag and by digest receive every blob with the digest asked for."""
    layout = test_images.alpine
    dest = workdir / "copy-tag"
    skopeo.copy(f"{registry_mirror.address}/library/alpine:latest", dest)
    assert (
        verify_dir_copy(dest) == len(layout.blobs) - 1
    )  # all but the manifest, stored as manifest.json
    dest = workdir / "copy-digest"
    skopeo.copy(f"{registry_mirror.address}/library/alpine@{layout.manifest_digest}", dest)
    assert verify_dir_copy(dest) == len(layout.blobs) - 1


def test_copy_all_multi_arch(
    skopeo: Skopeo, registry_mirror: Mirror, test_images: Images, workdir: Path
) -> None:
    """--all copies the index, each platform's manifest and every blob, all verified."""
    dest = workdir / "copy-multi"
    skopeo.copy(f"{registry_mirror.address}/library/multi:latest", dest, "--all")
    index = json.loads((dest / "manifest.json").read_text())
    assert len(index["manifests"]) == 2
    assert verify_dir_copy(dest) == len(test_images.multi.blobs) - 1


def test_missing_tag_is_manifest_unknown(skopeo: Skopeo, registry_mirror: Mirror) -> None:
    """A missing tag is a clean `manifest unknown` error from skopeo."""
    result = skopeo.inspect(f"{registry_mirror.address}/library/alpine:nope", check=False)
    assert result.returncode != 0
    assert "manifest unknown" in result.stderr


def test_registries_conf_mirror_of_docker_io(
    skopeo: Skopeo, registry_mirror: Mirror, test_images: Images, workdir: Path
) -> None:
    """As docker.io's mirror in registries.conf, mirrord serves docker.io/library/alpine."""
    conf = skopeo.registries_conf(registry_mirror.address)
    dest = workdir / "copy-mirror"
    skopeo.copy("docker.io/library/alpine:latest", dest, conf=conf)
    assert verify_dir_copy(dest) == len(test_images.alpine.blobs) - 1
    assert "GET /v2/library/alpine/manifests/latest -> 200" in registry_mirror.output()


def _raw_tls(
    mirror: Mirror, pki: Pki, payload: bytes, timeout: float = 10.0
) -> tuple[bytes, float]:
    context = mirror.tls_context(pki)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", mirror.port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(payload)
            chunks = []
            while True:
                data = tls.recv(65536)
                if not data:
                    break
                chunks.append(data)
    return b"".join(chunks), time.monotonic() - started


def test_oversized_header_over_tls_is_answered(registry_mirror: Mirror, pki: Pki) -> None:
    """A header line over 16 KiB gets 431 and a closed connection at once, not a hang."""
    payload = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    answer, elapsed = _raw_tls(registry_mirror, pki, payload)
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b'"code": "UNSUPPORTED"' in answer
    assert elapsed < 5


def test_traversal_never_reaches_upstream(registry_mirror: Mirror, pki: Pki) -> None:
    """Traversal and encoded slashes are refused with NAME_INVALID."""
    for path in (
        b"/v2/library/../../etc/manifests/latest",
        b"/v2/library%2falpine/manifests/latest",
    ):
        answer, _ = _raw_tls(
            registry_mirror,
            pki,
            b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert b"NAME_INVALID" in answer


def test_unreachable_primary_fails_over(
    workdir: Path, pki: Pki, registry: str, skopeo: Skopeo, test_images: Images
) -> None:
    """A primary that refuses connections is skipped: the pull comes from the next upstream."""
    mirror = start_mirror(workdir, pki, [f"http://127.0.0.1:{DEAD_PORT}", registry], "failover")
    try:
        result = skopeo.inspect(f"{mirror.address}/library/alpine:latest")
    finally:
        mirror.stop()
    assert json.loads(result.stdout)["Digest"] == test_images.alpine.manifest_digest
    assert f"upstream={registry} redirects=0 fallback=True" in mirror.output()


def test_unreachable_upstream_is_502(workdir: Path, pki: Pki) -> None:
    """With the only upstream refusing connections, the client gets 502 JSON promptly."""
    mirror = start_mirror(workdir, pki, [f"http://127.0.0.1:{DEAD_PORT}"], "dead")
    try:
        request = b"GET /v2/library/alpine/manifests/latest HTTP/1.1\r\nHost: x\r\n"
        answer, elapsed = _raw_tls(mirror, pki, request + b"Connection: close\r\n\r\n")
        probe, _ = _raw_tls(
            mirror, pki, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
    finally:
        mirror.stop()
    # The /v2/ probe is answered locally so cached content stays reachable.
    assert probe.startswith(b"HTTP/1.1 200 "), probe[:200]
    assert answer.startswith(b"HTTP/1.1 502 "), answer[:200]
    assert b'"UNAVAILABLE"' in answer
    assert elapsed < 5


def test_large_request_body_is_refused_at_once(registry_mirror: Mirror, pki: Pki) -> None:
    """A big or chunked upload is answered 413 before Twisted spools it anywhere."""
    for framing in (b"Content-Length: 100000000", b"Transfer-Encoding: chunked"):
        payload = b"POST /v2/library/alpine/blobs/uploads/ HTTP/1.1\r\nHost: x\r\n" + framing
        answer, elapsed = _raw_tls(registry_mirror, pki, payload + b"\r\n\r\n" + b"x" * 1000)
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert b"SIZE_INVALID" in answer
        assert elapsed < 5
