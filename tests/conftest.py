"""Fixtures shared by the unit tests (tests/) and the end-to-end tests
(tests/e2e/): real servers on loopback, started once per session and only
when a test asks for them."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.support.rgw import Rgw


@pytest.fixture(scope="session")
def rgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rgw]:
    """A one-node Ceph RGW (real S3) over HTTP and HTTPS (a test CA of its
    own: ``rgw.ca``); tests take a fresh bucket each with ``rgw.bucket()``."""
    missing = [
        p for p in ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin") if not shutil.which(p)
    ]
    if missing:
        # tests/run installs them: a missing one is a broken setup, not a skip.
        pytest.fail(
            f"the RGW fixture needs {', '.join(missing)} (Debian: radosgw ceph-mon ceph-osd)"
        )
    from tests.support.pki import make_pki
    from tests.support.rgw import Rgw

    directory = tmp_path_factory.mktemp("rgw")
    pki = make_pki(directory / "pki")
    server = Rgw.start(directory / "ceph", tls=(pki.fullchain, pki.privkey), ca=pki.ca)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def reactor() -> Iterator[Any]:
    """The global reactor running in a thread for the session (see
    ``tests.support.reactorthread``): for Twisted-native clients of real
    servers, called with ``tests.support.reactorthread.call``."""
    from tests.support.reactorthread import running_reactor

    yield from running_reactor()
