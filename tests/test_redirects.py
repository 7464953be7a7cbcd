"""Redirects followed by the mirror, client disconnects, and the small
resources (usage page, health check), in memory."""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from mirrord import config
from mirrord.front.usage import COPY_SCRIPT
from tests.support.memory import MemoryMirror
from tests.support.page import PAGE_TAGS, parse


class Redirector(Resource):
    """Answers from a table of redirects; anything else says where it landed."""

    isLeaf = True

    def __init__(self, name: str, routes: dict[str, tuple[int, str]]) -> None:
        super().__init__()
        self.name = name
        self.routes = routes
        self.seen: list[tuple[str, str]] = []

    def render(self, request: Request) -> bytes:
        path = request.path.decode()
        self.seen.append((request.method.decode(), path))
        if path in self.routes:
            code, location = self.routes[path]
            request.setResponseCode(code)
            request.setHeader(b"location", location.encode())
            return b"redirect body to be discarded"
        auth = "yes" if request.getHeader(b"authorization") else "no"
        request.setHeader(b"content-type", b"text/plain")
        return f"{self.name} {request.method.decode()} {path} auth={auth}".encode()


class RedirectTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.mirror = MemoryMirror(self, Path(tempfile.mkdtemp()), upstreams=("http://redir.test",))
        base = "/v2/library/a/manifests/"
        self.redirector = Redirector(
            "redir",
            {
                base + "relative": (301, "target"),
                base + "cross": (307, "http://other.test/blob?sig=1"),
                base + "ftp": (302, "ftp://files.example/x"),
                base + "loop": (302, "loop"),
                base + "see-other": (303, "target"),
            },
        )
        self.mirror.add_host(b"redir.test", self.redirector)
        self.mirror.add_host(b"other.test", Redirector("other", {}))
        self.auth = {"Authorization": "Bearer t"}

    def test_relative_redirect_keeps_credentials_on_same_origin(self) -> None:
        """A relative Location resolves against the request URL; same origin keeps the token."""
        reply = self.mirror.get("/v2/a/manifests/relative", self.auth)
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.body, b"redir GET /v2/library/a/manifests/target auth=yes")

    def test_cross_origin_redirect_drops_credentials(self) -> None:
        """A redirect to another origin is followed without Authorization."""
        reply = self.mirror.get("/v2/a/manifests/cross", self.auth)
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.body, b"other GET /blob auth=no")

    def test_head_redirect_stays_head(self) -> None:
        """A 303 to a HEAD request is followed with HEAD."""
        reply = self.mirror.request("HEAD", "/v2/a/manifests/see-other", self.auth)
        self.assertEqual(reply.code, 200)
        self.assertEqual(
            self.redirector.seen,
            [
                ("HEAD", "/v2/library/a/manifests/see-other"),
                ("HEAD", "/v2/library/a/manifests/target"),
            ],
        )

    def test_non_http_redirect_is_bad_gateway(self) -> None:
        """A redirect to a non-HTTP URL is refused with 502."""
        reply = self.mirror.get("/v2/a/manifests/ftp", self.auth)
        self.assertEqual(reply.code, 502)
        self.assertEqual(reply.json()["errors"][0]["code"], "UNAVAILABLE")

    def test_redirect_loop_is_capped(self) -> None:
        """A redirect loop ends after max_redirects with 502."""
        reply = self.mirror.get("/v2/a/manifests/loop", self.auth)
        self.assertEqual(reply.code, 502)
        self.assertIn("redirects", reply.json()["errors"][0]["message"])


class DisconnectTests(SynchronousTestCase):
    def test_client_disconnect_cancels_upstream_request(self) -> None:
        """A client that leaves while the upstream is still thinking closes the upstream request."""
        mirror = MemoryMirror(self, Path(tempfile.mkdtemp()))
        mirror.hub.hang = True
        d = mirror.client.get("https://mirror.test/v2/alpine/manifests/latest")
        mirror.settle()
        self.assertEqual(len(mirror.hub.hanging), 1)
        upstream_request = mirror.hub.hanging[0]
        gone = []
        upstream_request.notifyFinish().addErrback(gone.append)
        d.cancel()
        mirror.settle()
        self.failureResultOf(d)
        self.assertEqual(len(gone), 1, "the upstream request was left open")

    def test_client_disconnect_does_not_fail_over(self) -> None:
        """A client that leaves while the primary hangs is not served by the next upstream."""
        mirror = MemoryMirror(
            self, Path(tempfile.mkdtemp()), upstreams=("http://hub.test", "http://second.test")
        )
        mirror.hub.hang = True
        d = mirror.client.get("https://mirror.test/v2/alpine/manifests/latest")
        mirror.settle()
        d.cancel()
        mirror.settle()
        self.failureResultOf(d)
        self.assertEqual(mirror.second.counts["requests"], 0)


class SmallResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.mirror = MemoryMirror(self, Path(tempfile.mkdtemp()))

    def test_usage_page_has_client_configuration(self) -> None:
        """The usage page shows daemon.json, docker pull, hosts.toml and registries.conf."""
        reply = self.mirror.get("/", {"Host": "mirror.example.com"})
        self.assertEqual(reply.code, 200)
        page = reply.body.decode()
        self.assertIn(
            "&quot;registry-mirrors&quot;: [&quot;https://mirror.example.com&quot;]", page
        )
        self.assertIn("docker pull mirror.example.com/library/alpine", page)
        self.assertIn("/etc/containerd/certs.d/docker.io/hosts.toml", page)
        self.assertIn("[host.&quot;https://mirror.example.com&quot;]", page)
        self.assertIn("location = &quot;mirror.example.com&quot;", page)
        self.assertIn("http://hub.test", page)

    def test_usage_page_escapes_host(self) -> None:
        """A hostile Host header and hostile configured names reach the page only as text."""
        name = '"><script>alert(1)</script>'
        alias = "<img src=x onerror=alert(2)>"
        upstream = "http://second.test/<script>alert(3)</script>"
        hostile = config.from_mapping(
            {"registries": {name: {"upstreams": [upstream], "hosts": [alias]}}}
        ).registries[name]
        mirror = MemoryMirror(self, Path(tempfile.mkdtemp()), registries={name: hostile})
        host = '"><script>alert(4)</script>'
        reply = mirror.get("/?lang=en", {"Host": host})
        self.assertEqual(reply.code, 200)
        page = parse(reply.body)
        self.assertLessEqual(page.tags, PAGE_TAGS, "a value became markup")
        self.assertEqual(page.scripts, [COPY_SCRIPT], "a value became a script")
        self.assertEqual(page.active, [], "a value became an attribute")
        # Each configured value is on the page, as text.
        for value in (name, alias, upstream):
            self.assertIn(value, page.text)
        # The Host header is not sane: the page names the mirror's own address.
        self.assertNotIn("alert(4)", page.text)
        self.assertIn("mirrord at ", page.text)

    def test_hostile_host_not_in_challenge(self) -> None:
        """The token realm never carries an unsanitised Host."""
        reply = self.mirror.get("/v2/", {"Host": 'evil.example/x"'})
        self.assertNotIn("evil", reply.header("www-authenticate"))

    def test_healthz(self) -> None:
        reply = self.mirror.get("/healthz")
        self.assertEqual((reply.code, reply.body), (200, b"ok\n"))
