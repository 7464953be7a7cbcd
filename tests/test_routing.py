"""Several registries behind one mirror: by Host, by path prefix, by ?ns=."""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from mirrord import config
from mirrord.config import Registry
from mirrord.registry.errors import RegistryError
from mirrord.registry.reference import Reference
from mirrord.registry.routing import Router
from mirrord.serve.v2 import PARSED_MAX, RegistryProxy
from tests.support import images
from tests.support.memory import MemoryMirror


class RouterTests(SynchronousTestCase):
    def setUp(self) -> None:
        hub = Registry("docker.io", ("https://hub",), "library")
        ghcr = Registry("ghcr.io", ("https://ghcr",), hosts=("ghcr.mirror.example.com",))
        self.router = Router({"docker.io": (hub, "hub"), "ghcr.io": (ghcr, "ghcr")}, "docker.io")

    def route(self, path: str, host: str | None = None, ns: str | None = None) -> tuple[str, str]:
        found = self.router.route(path, host, ns)
        return found.target, found.path

    def test_routes(self) -> None:
        self.assertEqual(self.route("alpine/manifests/1"), ("hub", "alpine/manifests/1"))
        self.assertEqual(self.route("o/i/blobs/x", ns="ghcr.io"), ("ghcr", "o/i/blobs/x"))
        self.assertEqual(self.route("o/i/blobs/x", ns="docker.io"), ("hub", "o/i/blobs/x"))
        self.assertEqual(
            self.route("o/i/manifests/1", host="ghcr.mirror.example.com:443"),
            ("ghcr", "o/i/manifests/1"),
        )
        self.assertEqual(self.route("ghcr.io/o/i/manifests/1"), ("ghcr", "o/i/manifests/1"))
        self.assertEqual(
            self.route("docker.io/library/a/manifests/1"), ("hub", "library/a/manifests/1")
        )
        self.assertEqual(self.route("index.docker.io/a/manifests/1"), ("hub", "a/manifests/1"))
        self.assertEqual(self.route(""), ("hub", ""))

    def test_unserved_registries_are_name_unknown(self) -> None:
        for path, ns in (("x/manifests/1", "quay.io"), ("quay.io/x/manifests/1", None)):
            with self.subTest(path=path, ns=ns):
                error = self.assertRaises(RegistryError, self.router.route, path, None, ns)
                self.assertEqual((error.status, error.code), (404, "NAME_UNKNOWN"))

    def test_presets(self) -> None:
        """A preset's table may be empty: its upstream and naming come built in."""
        loaded = config.from_mapping({"registries": {"ghcr.io": {}, "quay.io": {}}})
        self.assertEqual(loaded.registries["ghcr.io"].upstreams, ("https://ghcr.io",))
        self.assertEqual(loaded.registries["quay.io"].official_prefix, "")
        self.assertEqual(set(loaded.registries), {"docker.io", "ghcr.io", "quay.io"})


class RoutedMirrorTests(SynchronousTestCase):
    """In memory: ghcr.io served by the anonymous fake at second.test."""

    def setUp(self) -> None:
        tmp = Path(tempfile.mkdtemp())
        ghcr = Registry("ghcr.io", ("http://second.test",), "", ("ghcr.mirror.test",))
        self.mirror = MemoryMirror(self, tmp, registries={"ghcr.io": ghcr})
        self.app = images.single_arch(tmp / "app")
        self.mirror.second.add("owner/app", self.app)
        self.mirror.second.add("alpine", self.app)

    def assertServed(self, reply) -> None:
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual(reply.header("docker-content-digest"), self.app.manifest_digest)

    def test_host_prefix_and_ns_routing(self) -> None:
        self.assertServed(
            self.mirror.get("/v2/owner/app/manifests/latest", {"Host": "ghcr.mirror.test"})
        )
        self.assertServed(self.mirror.get("/v2/ghcr.io/owner/app/manifests/latest"))
        self.assertServed(self.mirror.get("/v2/owner/app/manifests/latest?ns=ghcr.io"))
        self.assertEqual(self.mirror.hub.counts["requests"], 0)

    def test_library_prefix_only_for_docker_hub(self) -> None:
        """A one-component name stays as it is on other registries."""
        self.assertServed(self.mirror.get("/v2/ghcr.io/alpine/manifests/latest"))
        paths = [p for m, p, h in self.mirror.second.seen if "manifests" in p]
        self.assertIn("/v2/alpine/manifests/latest", paths)

    def test_unknown_registry_is_404_name_unknown(self) -> None:
        for path in ("/v2/x/manifests/latest?ns=quay.io", "/v2/quay.io/x/manifests/latest"):
            with self.subTest(path=path):
                reply = self.mirror.get(path)
                self.assertEqual(reply.code, 404)
                self.assertEqual(reply.json()["errors"][0]["code"], "NAME_UNKNOWN")

    def test_usage_page_lists_every_registry(self) -> None:
        page = self.mirror.get("/", {"Host": "m.example"}).body.decode()
        self.assertIn("docker pull m.example/ghcr.io/owner/image", page)
        self.assertIn("docker pull ghcr.mirror.test/owner/image", page)
        self.assertIn("/etc/containerd/certs.d/ghcr.io/hosts.toml", page)
        self.assertIn("/etc/containerd/certs.d/_default/hosts.toml", page)
        self.assertIn("location = &quot;m.example/ghcr.io&quot;", page)


class _Recorded:
    """A backend that answers with the registry and path it was given."""

    def __init__(self, name: str) -> None:
        self.name = name

    def serve_now(self, request: Request, ref: Reference, name: str, path: str, headers) -> bool:
        request.write(f"{self.name} {path}".encode())
        request.finish()
        return True

    async def serve(self, request: Request, ref: Reference, name: str, path: str, headers) -> None:
        raise AssertionError("answered at once")


class ParsedPathTests(SynchronousTestCase):
    """``RegistryProxy`` keeps recent paths routed and parsed."""

    def setUp(self) -> None:
        hub = Registry("docker.io", ("https://hub",), "library", deny=("library/secret",))
        ghcr = Registry("ghcr.io", ("https://ghcr",), hosts=("ghcr.mirror.example.com",))
        router = Router(
            {"docker.io": (hub, _Recorded("hub")), "ghcr.io": (ghcr, _Recorded("ghcr"))},
            "docker.io",
        )
        self.proxy = RegistryProxy(router)
        root = Resource()
        root.putChild(b"v2", self.proxy)
        self.channel = Site(root, reactor=Clock()).buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def get(self, path: str, host: str = "mirror") -> bytes:
        self.transport.clear()
        self.channel.dataReceived(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        return self.transport.value().partition(b"\r\n\r\n")[2]

    def test_same_path_routed_by_its_own_host_and_ns(self) -> None:
        """A path asked for again goes where its Host and ns send it, not
        where the first request's went; refused names stay refused."""
        path = "/v2/o/i/manifests/1"
        for _ in range(2):
            self.assertIn(b"\r\nhub /v2/o/i/manifests/1", self.get(path))
            self.assertIn(b"ghcr /v2/o/i/", self.get(path, "ghcr.mirror.example.com"))
            self.assertIn(b"ghcr /v2/o/i/", self.get(path + "?ns=ghcr.io"))
            self.assertIn(b"DENIED", self.get("/v2/secret/manifests/1"))

    def test_table_is_bounded(self) -> None:
        """However many distinct paths come, the table of parsed paths stays bounded."""
        for i in range(PARSED_MAX + 10):
            self.get(f"/v2/o/i{i}/manifests/1")
        self.assertLessEqual(len(self.proxy._parsed), PARSED_MAX)
