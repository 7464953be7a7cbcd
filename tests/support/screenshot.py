"""Make README's screenshot of the status page, the way the Chromium test
takes one: ``python -m tests.support.screenshot docs/status.png``.

Everything on loopback: a fake Docker Hub with a few images, a real
``twistd mirrord`` in front of it, a few minutes of pulls (misses first,
then hits, so the charts have bars), a 429 at the end (so one upstream is
shown resting), then headless Chromium.
"""

from __future__ import annotations

import json
import ssl
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.support import images
from tests.support.browser import screenshot
from tests.support.pki import make_pki
from tests.support.processes import Process, free_port, mirrord_argv

ACCEPT = "application/vnd.oci.image.manifest.v1+json"


def _get(opener: urllib.request.OpenerDirector, url: str, accept: str = "") -> bytes:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with opener.open(request, timeout=60) as response:
        return response.read()


def pull(opener: urllib.request.OpenerDirector, mirror: str, name: str) -> None:
    """What a client does: the manifest by tag, then every blob it names."""
    manifest = json.loads(_get(opener, f"{mirror}/v2/{name}/manifests/latest", ACCEPT))
    for blob in [manifest["config"], *manifest["layers"]]:
        _get(opener, f"{mirror}/v2/{name}/blobs/{blob['digest']}")


def main(out: Path, minutes: int = 4) -> None:
    work = Path(tempfile.mkdtemp(prefix="mirrord-screenshot-"))
    pki = make_pki(work / "pki")
    names = {"library/alpine": (3_000_000, 2_000_000), "library/debian": (9_000_000,)}
    names["library/python"] = (6_000_000, 5_000_000)
    layouts = {
        n: images.single_arch(work / n.replace("/", "-"), layer_sizes=s) for n, s in names.items()
    }
    hub_port, cdn_port, port = free_port(), free_port(), free_port()
    hub = Process(
        "hub",
        [
            sys.executable,
            "-m",
            "tests.support.fakehub",
            "--port",
            str(hub_port),
            "--cdn-port",
            str(cdn_port),
            "--no-auth",
            *[f"--image={n}={layout.path}:latest" for n, layout in layouts.items()],
        ],
        hub_port,
        work / "hub.log",
    ).start()
    config = work / "mirrord.toml"
    config.write_text('[cache]\nmax_size = "2GiB"\n')
    mirror = Process(
        "mirrord",
        mirrord_argv(
            "--config",
            str(config),
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--cert",
            str(pki.fullchain),
            "--key",
            str(pki.privkey),
            "--state-dir",
            str(work / "state"),
            "--upstream",
            f"http://127.0.0.1:{hub_port}",
        ),
        port,
        work / "mirrord.log",
    ).start()
    try:
        context = ssl.create_default_context(cafile=str(pki.ca))
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        base = f"https://localhost:{port}"
        order = list(layouts)
        for minute in range(minutes):
            started = time.monotonic()
            # A new image now and then, the others again (hits).
            for name in order[: 1 + minute // 2]:
                for _ in range(1 + minute % 3):
                    pull(opener, base, name)
            time.sleep(max(0.0, 61 - (time.monotonic() - started)))
        control = urllib.request.Request(
            f"http://127.0.0.1:{hub_port}/_control",
            data=json.dumps({"ratelimit": True, "retry_after": 900}).encode(),
            method="POST",
        )
        opener.open(control, timeout=10).read()
        try:
            # A manifest by a digest not cached: a GET upstream, answered 429.
            _get(opener, f"{base}/v2/library/alpine/manifests/sha256:{'0' * 64}", ACCEPT)
        except urllib.error.HTTPError:
            pass  # the 429 is the point
        visit = screenshot(f"https://127.0.0.1:{port}/?lang=en", out, 1000, 1250)
        if visit.console:
            raise SystemExit(f"console messages: {visit.console}")
        print(f"wrote {out}")
    finally:
        mirror.stop()
        hub.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/status.png"))
