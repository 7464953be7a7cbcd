"""A transfer cut by the CDN, end to end: the mirror resumes it with one
ranged request and skopeo gets a whole, verified image."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import Images, Skopeo, start_mirror, verify_dir_copy
from tests.support.pki import Pki


def test_cut_transfer_completes_with_one_ranged_request(
    skopeo: Skopeo, hubs, test_images: Images, workdir: Path, pki: Pki
) -> None:
    """The CDN cuts the larger layer once: skopeo's pull still succeeds,
    verified, and the CDN saw exactly one ranged request."""
    hub, _ = hubs
    mirror = start_mirror(workdir, pki, [hub.url], "resume")  # an empty cache
    before = hub.control(cdn_cut_at=60_000, cdn_cuts=1)["counts"]
    try:
        dest = workdir / "resume-copy"
        skopeo.copy(f"{mirror.address}/library/alpine:latest", dest)
        assert verify_dir_copy(dest) == len(test_images.alpine.blobs) - 1
        after = hub.control()["counts"]
    finally:
        hub.control(cdn_cut_at=None, cdn_cuts=1)
        mirror.stop()
    assert after.get("cdn cuts", 0) - before.get("cdn cuts", 0) == 1
    assert after.get("cdn ranged", 0) - before.get("cdn ranged", 0) == 1
    assert "cut at 60000 bytes" in mirror.output()
