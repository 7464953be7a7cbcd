"""Fixtures for end-to-end tests: real processes on loopback only.

docker-registry (the CNCF distribution registry) is the real upstream,
filled by skopeo; the fake Docker Hub (Twisted) plays Hub's token service,
CDN redirects and rate limits; mirrord runs as ``twistd mirrord``; skopeo is
the client, confined to loopback by its registries.conf and a dead proxy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import images
from tests.support.pki import Pki, make_pki
from tests.support.processes import DEAD_PORT, Process, free_port, mirrord_argv, run

if not shutil.which("skopeo") or not shutil.which("docker-registry"):
    pytest.skip("end-to-end tests need skopeo and docker-registry", allow_module_level=True)

POLICY = {"default": [{"type": "insecureAcceptAnything"}]}


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def pki(workdir: Path) -> Pki:
    return make_pki(workdir / "pki")


@dataclass
class Images:
    alpine: images.Layout
    multi: images.Layout
    private: images.Layout


@pytest.fixture(scope="session")
def test_images(workdir: Path) -> Images:
    return Images(
        images.single_arch(workdir / "img-alpine"),
        images.multi_arch(workdir / "img-multi"),
        images.single_arch(workdir / "img-private"),
    )


class Skopeo:
    """skopeo confined to loopback: every registry it may fall back to is dead."""

    def __init__(self, workdir: Path, pki: Pki) -> None:
        self.workdir = workdir
        self.pki = pki
        self.policy = workdir / "policy.json"
        self.policy.write_text(json.dumps(POLICY))
        self.env = {
            "HTTPS_PROXY": f"http://127.0.0.1:{DEAD_PORT}",
            "HTTP_PROXY": f"http://127.0.0.1:{DEAD_PORT}",
        }

    def registries_conf(self, mirror_location: str) -> Path:
        path = self.workdir / f"registries-{abs(hash(mirror_location))}.conf"
        path.write_text(
            "unqualified-search-registries = []\n"
            '[[registry]]\nprefix = "docker.io"\n'
            f'location = "127.0.0.1:{DEAD_PORT}"\n'
            f'[[registry.mirror]]\nlocation = "{mirror_location}"\n'
        )
        return path

    def __call__(
        self, *args: str, conf: Path | None = None, check: bool = True, timeout: float = 120
    ):
        conf = conf or self.registries_conf(f"127.0.0.1:{DEAD_PORT}")
        argv = ["skopeo", "--registries-conf", str(conf), "--policy", str(self.policy), *args]
        return run(argv, timeout=timeout, env=self.env, check=check)

    def inspect(self, ref: str, *extra: str, **kw):
        return self(
            "inspect",
            "--cert-dir",
            str(self.pki.cert_dir),
            "--retry-times",
            "0",
            *extra,
            f"docker://{ref}",
            **kw,
        )

    def copy(self, ref: str, dest: Path, *extra: str, **kw):
        shutil.rmtree(dest, ignore_errors=True)
        return self(
            "copy",
            "--src-cert-dir",
            str(self.pki.cert_dir),
            "--retry-times",
            "0",
            *extra,
            f"docker://{ref}",
            f"dir:{dest}",
            **kw,
        )


@pytest.fixture(scope="session")
def skopeo(workdir: Path, pki: Pki) -> Skopeo:
    return Skopeo(workdir, pki)


@pytest.fixture(scope="session")
def registry(workdir: Path, test_images: Images, skopeo: Skopeo) -> Iterator[str]:
    """docker-registry on loopback with library/alpine and a multi-arch library/multi."""
    port = free_port()
    config = workdir / "registry.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {workdir / 'registry-data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    process = Process(
        "docker-registry", ["docker-registry", "serve", str(config)], port, workdir / "registry.log"
    ).start()
    address = f"127.0.0.1:{port}"
    for layout, name, extra in (
        (test_images.alpine, "library/alpine", []),
        (test_images.multi, "library/multi", ["--all"]),
        (test_images.alpine, "owner/app", []),
    ):
        skopeo(
            "copy",
            "--dest-tls-verify=false",
            *extra,
            f"oci:{layout.path}:{layout.tag}",
            f"docker://{address}/{name}:latest",
        )
    yield f"http://{address}"
    process.stop()


@pytest.fixture(scope="session")
def hubs(workdir: Path, test_images: Images) -> Iterator[tuple[Hub, Hub]]:
    """A fake Docker Hub (tokens, CDN, private repo) and an anonymous second upstream."""
    big = workdir / "big.bin"
    digest = hashlib.sha256()
    with big.open("wb") as f:
        for _ in range(256):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            f.write(chunk)
    big_digest = "sha256:" + digest.hexdigest()
    started = []
    for name, extra in (
        (
            "hub",
            [
                "--private",
                "alice/private",
                "--user",
                "alice:secret",
                "--image",
                f"alice/private={test_images.private.path}:latest",
                "--blob",
                f"{big_digest}={big}",
            ],
        ),
        ("second", ["--no-auth"]),
    ):
        port, cdn = free_port(), free_port()
        argv = [
            sys.executable,
            "-m",
            "tests.support.fakehub",
            "--port",
            str(port),
            "--cdn-port",
            str(cdn),
            "--image",
            f"library/alpine={test_images.alpine.path}:latest",
            *extra,
        ]
        process = Process(name, argv, port, workdir / f"{name}.log").start()
        started.append(Hub(f"http://127.0.0.1:{port}", process, big_digest, 256 << 20))
    yield started[0], started[1]
    for hub in started:
        hub.process.stop()


@dataclass
class Hub:
    url: str
    process: Process
    big_digest: str
    big_size: int

    def control(self, **changes) -> dict:
        import urllib.request

        request = urllib.request.Request(
            f"{self.url}/_control", data=json.dumps(changes).encode(), method="POST"
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        opener.open(request, timeout=10).read()
        return json.loads(opener.open(f"{self.url}/_control", timeout=10).read())


class Mirror(Process):
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def tls_context(self, pki: Pki) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(pki.ca))


def start_mirror(
    workdir: Path,
    pki: Pki,
    upstreams: list[str],
    name: str,
    *extra: str,
    config: str = "",
    port: int | None = None,
    env: dict[str, str] | None = None,
) -> Mirror:
    """A twistd mirrord on loopback; ``config`` is its TOML file's text;
    ``port`` when the config must name it (a fleet member's address);
    ``env`` added to its environment."""
    port = port or free_port()
    config_path = workdir / (f"{name}.toml" if config else "empty.toml")
    argv = [
        *mirrord_argv(),
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--cert",
        str(pki.fullchain),
        "--key",
        str(pki.privkey),
        "--state-dir",
        str(workdir / f"state-{name}"),
        "--config",
        str(config_path),
        *[arg for url in upstreams for arg in ("--upstream", url)],
        *extra,
    ]
    config_path.write_text(config)
    return Mirror(name, argv, port, workdir / f"mirror-{name}.log", env=env or {}).start()


@pytest.fixture(scope="session")
def registry_mirror(workdir: Path, pki: Pki, registry: str) -> Iterator[Mirror]:
    mirror = start_mirror(workdir, pki, [registry], "registry")
    yield mirror
    mirror.stop()


@pytest.fixture(scope="session")
def hub_mirror(workdir: Path, pki: Pki, hubs) -> Iterator[Mirror]:
    mirror = start_mirror(workdir, pki, [hubs[0].url, hubs[1].url], "hub")
    yield mirror
    mirror.stop()


def verify_dir_copy(dest: Path) -> int:
    """Every blob skopeo wrote is named by its sha256; return how many were checked."""
    checked = 0
    for path in dest.iterdir():
        stem = path.name.removesuffix(".manifest.json")
        if len(stem) == 64:
            assert hashlib.sha256(path.read_bytes()).hexdigest() == stem, path
            checked += 1
    return checked
