"""Warming end to end: ``python -m mirrord.warm`` against ``twistd
mirrord`` in front of the fake Hub process, and the daemon's own
``[cache] warm``; skopeo afterwards finds everything cached."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tests.e2e.conftest import Images, Skopeo, start_mirror, verify_dir_copy
from tests.support.pki import Pki
from tests.support.processes import run


def _no_upstream_blobs(skopeo: Skopeo, hub, ref: str, dest: Path, blobs: int) -> None:
    before = hub.control()["counts"]
    skopeo.copy(ref, dest)
    assert verify_dir_copy(dest) == blobs
    after = hub.control()["counts"]
    assert after.get("GET blobs", 0) == before.get("GET blobs", 0)
    assert after.get("cdn GET", 0) == before.get("cdn GET", 0)


def test_warm_command_fills_the_cache(
    skopeo: Skopeo, hubs, test_images: Images, workdir: Path, pki: Pki
) -> None:
    """python -m mirrord.warm exits 0, and a following skopeo copy asks upstream for no blob."""
    hub, _ = hubs
    mirror = start_mirror(workdir, pki, [hub.url], "warm-cli", config="[cache]\ntag_ttl = 0\n")
    blobs = len(test_images.alpine.blobs) - 1
    try:
        before = hub.control()["counts"]
        result = run(
            [
                sys.executable,
                "-m",
                "mirrord.warm",
                "--ca",
                str(pki.ca),
                f"https://{mirror.address}",
                "library/alpine:latest",
            ],
            timeout=60,
        )
        assert "library/alpine:latest: ok, 1 manifests, 3 blobs" in result.stdout, result.stdout
        # Off a terminal: a plain line per blob.
        assert result.stdout.count(": blob sha256:") == blobs
        after = hub.control()["counts"]
        assert after.get("cdn GET", 0) - before.get("cdn GET", 0) == blobs
        _no_upstream_blobs(
            skopeo, hub, f"{mirror.address}/library/alpine:latest", workdir / "warm-cli", blobs
        )

        missing = run(
            [
                sys.executable,
                "-m",
                "mirrord.warm",
                "--ca",
                str(pki.ca),
                f"https://{mirror.address}",
                "library/alpine:nosuchtag",
                "library/alpine:latest",
            ],
            timeout=60,
            check=False,
        )
        assert missing.returncode == 1
        assert "library/alpine:nosuchtag: FAILED: manifest nosuchtag: 404" in missing.stdout
        assert "library/alpine:latest: ok" in missing.stdout
    finally:
        mirror.stop()


def test_warm_command_refuses_an_untrusted_mirror(hubs, workdir: Path, pki: Pki) -> None:
    """Without --ca the test CA is not trusted: the run fails with exit 1 and says why."""
    hub, _ = hubs
    mirror = start_mirror(workdir, pki, [hub.url], "warm-untrusted")
    try:
        result = run(
            [
                sys.executable,
                "-m",
                "mirrord.warm",
                f"https://{mirror.address}",
                "library/alpine:latest",
            ],
            timeout=60,
            check=False,
        )
    finally:
        mirror.stop()
    assert result.returncode == 1
    assert "library/alpine:latest: FAILED" in result.stdout
    assert "certificate verify failed" in result.stdout


def test_daemon_warms_its_cache_through_its_own_listener(
    skopeo: Skopeo, hubs, test_images: Images, workdir: Path, pki: Pki
) -> None:
    """With [cache] warm the daemon pulls via its own listener at start; a bad image is logged."""
    hub, _ = hubs
    config = '[cache]\ntag_ttl = 0\nwarm = ["library/alpine:latest", "library/alpine:gone"]\n'
    mirror = start_mirror(workdir, pki, [hub.url], "warm-daemon", config=config)
    blobs = len(test_images.alpine.blobs) - 1
    try:
        deadline = time.monotonic() + 30
        while "warmed library/alpine:latest" not in mirror.output():
            assert time.monotonic() < deadline, mirror.output()
            time.sleep(0.1)
        _no_upstream_blobs(
            skopeo, hub, f"{mirror.address}/library/alpine:latest", workdir / "warm-daemon", blobs
        )
    finally:
        mirror.stop()
    log = mirror.output()
    assert "warming library/alpine:gone failed: manifest gone: 404 MANIFEST_UNKNOWN" in log, log
    # The warm requests went through the front door: the access log has
    # the blob misses (skopeo's pull after them was all hits).
    misses = [
        line
        for line in log.splitlines()
        if "GET /v2/library/alpine/blobs/sha256:" in line and "cache=MISS" in line
    ]
    assert len(misses) == blobs, log
