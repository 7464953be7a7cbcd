"""Failed mirror logins against a real twistd: the limit holds for guesses
sent at once, and the right password is refused until the window passes."""

from __future__ import annotations

import base64
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mirrord.passwords import make_hash
from tests.e2e.conftest import Mirror, start_mirror
from tests.e2e.test_pull import _raw_tls
from tests.support.pki import Pki


def _get(mirror: Mirror, pki: Pki, password: str) -> tuple[int, str | None]:
    credentials = base64.b64encode(f"ops:{password}".encode()).decode()
    answer, _ = _raw_tls(
        mirror,
        pki,
        f"GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {credentials}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    status = int(answer.split(b" ", 2)[1])
    retry = re.search(rb"\r\nRetry-After: (\d+)\r\n", answer)
    return status, retry.group(1).decode() if retry else None


def test_guesses_at_once_get_only_the_limit(workdir: Path, pki: Pki, registry: str) -> None:
    """Twelve guesses at once: three are checked (401); the rest, then the right one, get 429."""
    config = workdir / "failed-logins.toml"
    config.write_text(
        "[access]\nmax_failed_logins = 3\nfailed_login_window = 60\n"
        f'[access.users]\nops = "{make_hash("s3cret")}"\n'
        f'[registries."docker.io"]\nupstreams = ["{registry}"]\n'
    )
    mirror = start_mirror(workdir, pki, [], "failed-logins", "--config", str(config))
    try:
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda i: _get(mirror, pki, f"guess{i}"), range(12)))
        statuses = sorted(status for status, _ in answers)
        assert statuses == [401] * 3 + [429] * 9, answers
        assert all(retry is not None for status, retry in answers if status == 429)
        status, retry = _get(mirror, pki, "s3cret")
        assert status == 429 and retry is not None and 50 <= int(retry) <= 60, (status, retry)
    finally:
        mirror.stop()
