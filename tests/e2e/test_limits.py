"""Docker Hub's limits end to end with skopeo: the mirror's own account,
tokens signed by the mirror, and pulls that survive a rate-limit rest and a
complete outage."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from tests.e2e.conftest import Images, Skopeo, start_mirror, verify_dir_copy
from tests.support.pki import Pki

ACCOUNT = "mirror"
PASSWORD = "hub-access-token"


def _account_config(workdir: Path) -> str:
    secret = workdir / "hub.token"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    return f'[registries."docker.io"]\nusername = "{ACCOUNT}"\npassword_file = "{secret}"\n'


def test_account_counts_the_pulls_and_keeps_private_repositories_closed(
    skopeo: Skopeo, hubs, test_images: Images, workdir: Path, pki: Pki
) -> None:
    """Anonymous pulls count against the mirror's account, the clients'
    tokens come from the mirror, and a private repository the account can
    read stays closed to anonymous clients while --creds opens it."""
    hub, second = hubs
    hub.control(users={"alice": "secret", ACCOUNT: PASSWORD}, pulls={}, reset_counts=True)
    mirror = start_mirror(
        workdir, pki, [hub.url, second.url], "account", config=_account_config(workdir)
    )
    try:
        pulls = 3
        for i in range(pulls):
            dest = workdir / f"account-copy-{i}"
            skopeo.copy(f"{mirror.address}/library/alpine:latest", dest)
            assert verify_dir_copy(dest) == len(test_images.alpine.blobs) - 1
        state = hub.control()
        assert state["pulls"] == {ACCOUNT: 1}  # later pulls: the tag's HEAD, then the cache
        counts = state["counts"]
        # Token-service round trips: one of the mirror's own for the scope
        # and one anonymous publicity check, whatever the number of pulls.
        assert counts.get(f"token {ACCOUNT}", 0) == 1
        assert counts.get("token", 0) <= 2

        private = f"{mirror.address}/alice/private:latest"
        assert skopeo.inspect(private, check=False).returncode != 0
        found = json.loads(skopeo.inspect(private, "--creds", "alice:secret").stdout)
        assert found["Digest"] == test_images.private.manifest_digest
        assert skopeo.inspect(private, check=False).returncode != 0  # cached, still closed
    finally:
        mirror.stop()
        hub.control(users={"alice": "secret"})
    assert PASSWORD not in mirror.output()


def test_pull_through_a_complete_outage(
    skopeo: Skopeo, hubs, test_images: Images, workdir: Path, pki: Pki
) -> None:
    """Registry, CDN and token service all down: a cached image is pulled
    with the usual token flow."""
    hub, second = hubs
    mirror = start_mirror(
        workdir, pki, [hub.url, second.url], "outage", config="[cache]\ntag_ttl = 0\n"
    )
    ref = f"{mirror.address}/library/alpine:latest"
    try:
        skopeo.copy(ref, workdir / "outage-first")
        hub.control(outage=True, auth_down=True)
        second.control(outage=True)
        dest = workdir / "outage-second"
        skopeo.copy(ref, dest)
        assert verify_dir_copy(dest) == len(test_images.alpine.blobs) - 1
    finally:
        hub.control(outage=False, auth_down=False)
        second.control(outage=False)
        mirror.stop()


def test_pull_spanning_the_end_of_a_rest(
    skopeo: Skopeo, hubs, test_images: Images, workdir: Path, pki: Pki
) -> None:
    """A pull that starts while the only upstream rests after a 429 goes on
    once the rest ends: skopeo honours Retry-After with the token it has."""
    hub, _ = hubs
    mirror = start_mirror(workdir, pki, [hub.url], "rest")
    hub.control(ratelimit=True, retry_after=3, reset_counts=True)
    stop = threading.Event()

    def lift_after_first_429() -> None:
        # The rest ends only once the pull has met it (the machine may be slow).
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            if hub.control()["counts"].get("429", 0) >= 1:
                hub.control(ratelimit=False, retry_after=None)
                return
            time.sleep(0.2)

    lifter = threading.Thread(target=lift_after_first_429, daemon=True)
    try:
        lifter.start()
        dest = workdir / "rest-copy"
        skopeo.copy(f"{mirror.address}/library/alpine:latest", dest)
        assert verify_dir_copy(dest) == len(test_images.alpine.blobs) - 1
        assert hub.control()["counts"].get("429", 0) >= 1
    finally:
        stop.set()
        lifter.join(5)
        hub.control(ratelimit=False, retry_after=None)
        mirror.stop()
    assert "authentication required" not in mirror.output()
