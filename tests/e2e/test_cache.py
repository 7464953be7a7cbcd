"""The cache end to end: skopeo through twistd mirrord in front of the fake
Hub, counting what reaches upstream."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import Images, Skopeo, start_mirror, verify_dir_copy
from tests.support.pki import Pki


def test_second_pull_and_outage_pull_come_from_cache(
    skopeo: Skopeo, hubs, test_images: Images, workdir: Path, pki: Pki
) -> None:
    """A second pull makes no upstream blob request; with every upstream down it still works."""
    hub, second = hubs
    # Every tag pull asks upstream (tag_ttl = 0), so the outage pull shows STALE.
    mirror = start_mirror(
        workdir, pki, [hub.url, second.url], "cache", config="[cache]\ntag_ttl = 0\n"
    )
    ref = f"{mirror.address}/library/alpine:latest"
    blobs = len(test_images.alpine.blobs) - 1
    try:
        skopeo.copy(ref, workdir / "cache-first")
        assert verify_dir_copy(workdir / "cache-first") == blobs
        before = hub.control()["counts"]
        skopeo.copy(ref, workdir / "cache-second")
        assert verify_dir_copy(workdir / "cache-second") == blobs
        after = hub.control()["counts"]
        assert after.get("GET blobs", 0) == before.get("GET blobs", 0)
        assert after.get("cdn GET", 0) == before.get("cdn GET", 0)
        assert after.get("GET manifests", 0) == before.get("GET manifests", 0)

        hub.control(outage=True)
        second.control(outage=True)
        try:
            skopeo.copy(ref, workdir / "cache-outage")
            assert verify_dir_copy(workdir / "cache-outage") == blobs
        finally:
            hub.control(outage=False)
            second.control(outage=False)
    finally:
        mirror.stop()
    log = mirror.output()
    assert "cache=STALE" in log
    assert "cache=HIT" in log
