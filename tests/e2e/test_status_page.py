"""The usage and status page in a real browser: headless Chromium loads it
from a real twistd on loopback, after real pulls by skopeo. It must render
with no console message (so the copy script runs under the page's CSP and
nothing is refused), show the charts, and show hostile configured names
and a hostile ``Host`` only as text."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrord.front.usage import COPY_SCRIPT
from tests.e2e.conftest import Mirror, Skopeo, start_mirror
from tests.support.browser import HostRewriter, chromium_binary, dump_dom, screenshot
from tests.support.page import PAGE_TAGS, parse
from tests.support.pki import Pki

pytestmark = pytest.mark.skipif(not chromium_binary(), reason="needs chromium")

HOSTILE_NAME = '"><script>alert(1)</script>'
HOSTILE_ALIAS = "<img src=x onerror=alert(2)>"
HOSTILE_HOST = '"><script>alert(4)</script>'
# A browser's parser adds tbody to tables.
DOM_TAGS = PAGE_TAGS | {"tbody"}


@pytest.fixture(scope="module")
def status_mirror(workdir: Path, pki: Pki, registry: str, skopeo: Skopeo) -> Iterator[Mirror]:
    upstream = f"{registry}/<script>alert(3)</script>"
    config = (
        f'[registries."docker.io"]\nupstreams = ["{registry}"]\n'
        f"[registries.{json.dumps(HOSTILE_NAME)}]\n"
        f"upstreams = [{json.dumps(upstream)}]\nhosts = [{json.dumps(HOSTILE_ALIAS)}]\n"
    )
    mirror = start_mirror(workdir, pki, [], "status", config=config)
    for _ in range(2):  # a miss, then a hit
        skopeo.inspect(f"{mirror.address}/library/alpine:latest")
    yield mirror
    mirror.stop()


def assert_only_text(dom: str, *values: str) -> None:
    """Every value is on the page as text; none became markup, script or attribute."""
    page = parse(dom.encode())
    assert page.tags <= DOM_TAGS, page.tags - DOM_TAGS
    assert page.scripts == [COPY_SCRIPT]
    assert page.active == []
    for value in values:
        assert value in page.text


def test_page_renders_without_console_messages(status_mirror: Mirror) -> None:
    """The English page loads with no console message, its charts and figures,
    copy buttons the script revealed, and the hostile names as text."""
    visit = dump_dom(f"https://{status_mirror.address}/", language="en-US")
    assert visit.dom.startswith("<!DOCTYPE html>"), visit.stderr[-2000:]
    assert visit.console == []
    assert '<html lang="en">' in visit.dom
    assert visit.dom.count('<svg class="chart"') == 2
    # The inline script ran (the CSP let it): it unhid every copy button.
    assert visit.dom.count('class="copy"') >= 8
    assert '<button type="button" class="copy" hidden' not in visit.dom
    page = parse(visit.dom.encode())
    assert "Hit ratio" in page.text
    # skopeo's second inspect was served from the cache.
    ratio = re.search(r"Last hour\s*\d+ % \((\d+) of (\d+)\)", page.text)
    assert ratio, page.text
    assert int(ratio.group(1)) >= 1 and int(ratio.group(2)) >= 2
    assert f"docker pull {status_mirror.address}/library/alpine" in page.text
    assert_only_text(visit.dom, HOSTILE_NAME, HOSTILE_ALIAS, "/<script>alert(3)</script>")


def test_language_follows_the_browser(status_mirror: Mirror) -> None:
    """A browser asking for Chinese gets the Chinese page with the switch to
    English; one preferring French, then English, gets English."""
    visit = dump_dom(f"https://{status_mirror.address}/", language="zh-CN")
    assert visit.console == []
    assert '<html lang="zh-CN">' in visit.dom
    text = parse(visit.dom.encode()).text
    assert "状态" in text and "命中率" in text and "English" in text
    visit = dump_dom(f"https://{status_mirror.address}/", language="fr-FR,en;q=0.8")
    assert '<html lang="en">' in visit.dom


def test_hostile_host_is_not_markup(status_mirror: Mirror) -> None:
    """A page asked for with a hostile Host (through a proxy that sets it)
    renders without console messages and shows the mirror's own address."""
    proxy = HostRewriter(status_mirror.port, HOSTILE_HOST)
    try:
        visit = dump_dom(
            "http://mirror.test/?lang=en", f"--proxy-server=http://127.0.0.1:{proxy.port}"
        )
    finally:
        proxy.close()
    assert proxy.seen, "the page did not come through the proxy"
    assert visit.console == []
    assert_only_text(visit.dom, f"mirrord at {status_mirror.address}", HOSTILE_NAME)
    assert "alert(4)" not in visit.dom


def test_screenshot(status_mirror: Mirror, tmp_path: Path) -> None:
    """The screenshot command README's picture is made with gives a PNG of the page."""
    path = tmp_path / "status.png"
    visit = screenshot(f"https://{status_mirror.address}/?lang=en", path, 900, 1200)
    assert visit.console == []
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (900, 1200)
