"""``mirrord-admin`` against a running twistd mirrord: its admin socket is
private (0600), lists what a pull cached and deletes it while the daemon
serves; stopped, the same commands work on the state directory."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

from tests.e2e.conftest import Images, Skopeo, start_mirror, verify_dir_copy
from tests.support.pki import Pki
from tests.support.processes import run


def admin(state: Path, *args: str, check: bool = True):
    command = Path(sys.executable).parent / "mirrord-admin"
    return run([str(command), "--state-dir", str(state), *args], timeout=60, check=check)


def test_list_and_delete_through_the_socket_of_a_running_daemon(
    skopeo: Skopeo, hubs, test_images: Images, workdir: Path, pki: Pki
) -> None:
    """While the daemon runs, its 0600 socket lists the pulled image and deletes it, and the
    next pull fetches the blobs upstream again; stopped, the state directory answers."""
    hub, second = hubs
    mirror = start_mirror(workdir, pki, [hub.url, second.url], "admin")
    state = workdir / "state-admin"
    ref = f"{mirror.address}/library/alpine:latest"
    blobs = len(test_images.alpine.blobs) - 1
    try:
        skopeo.copy(ref, workdir / "admin-first")
        sock = state / "admin.sock"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        listed = json.loads(admin(state, "--json", "list").stdout)
        alpine = [r for r in listed if r["repository"] == "library/alpine"]
        assert [t["tag"] for t in alpine[0]["tags"]] == ["latest"]
        assert alpine[0]["blobs"] >= blobs

        deleted = json.loads(admin(state, "--json", "delete", "library/alpine").stdout)
        assert len(deleted["blobs"]) == alpine[0]["blobs"]
        assert not list((state / "cache" / "blobs").glob("*/*/*/data"))
        # The daemon did it (its index and gauges follow), not the CLI behind its back.
        assert "admin deleted" in (workdir / "mirror-admin.log").read_text()
        assert json.loads(admin(state, "--json", "list").stdout) == []

        before = hub.control()["counts"]
        skopeo.copy(ref, workdir / "admin-second")
        assert verify_dir_copy(workdir / "admin-second") == blobs
        after = hub.control()["counts"]
        fetched = after.get("GET blobs", 0) + after.get("cdn GET", 0)
        assert fetched > before.get("GET blobs", 0) + before.get("cdn GET", 0)
    finally:
        mirror.stop()
    # Stopped: the state directory itself, the socket left behind ignored.
    listed = json.loads(admin(state, "--json", "list").stdout)
    assert [r["repository"] for r in listed] == ["library/alpine"]
    admin(state, "delete", "library/alpine:latest")
    assert json.loads(admin(state, "--json", "list").stdout) == []
