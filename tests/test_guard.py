"""Not an open relay: each control refuses what it should, with the
registry's error, while a permitted request in the same mirror works."""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mirrord.config import Access, Registry
from tests.support.memory import MemoryMirror

OK = "/v2/alpine/manifests/latest"


class GuardTests(SynchronousTestCase):
    def mirror(self, **access: object) -> MemoryMirror:
        return MemoryMirror(
            self,
            Path(tempfile.mkdtemp()),
            upstreams=("http://second.test",),  # anonymous: no token dance needed
            access=Access(**access),  # type: ignore[arg-type]
        )

    def assertRefused(self, reply, status: int, code: str) -> None:
        self.assertEqual(reply.code, status, reply.body)
        self.assertEqual(reply.json()["errors"][0]["code"], code)

    def test_blocked_user_agent(self) -> None:
        mirror = self.mirror(block_user_agents=("(?i)^curl/", "Go-http-client"))
        self.assertRefused(mirror.get(OK, {"User-Agent": "curl/8.0"}), 403, "DENIED")
        self.assertEqual(mirror.get(OK, {"User-Agent": "containerd/1.7"}).code, 200)
        self.assertEqual(mirror.second.counts["GET manifests"], 1)

    def test_allow_list_and_trusted_proxy(self) -> None:
        """Outside the allow-list is 403; X-Forwarded-For counts only from a trusted proxy."""
        outside = self.mirror(allow_clients=("10.0.0.0/8",))
        self.assertRefused(outside.get(OK), 403, "DENIED")
        self.assertRefused(outside.get(OK, {"X-Forwarded-For": "10.1.2.3"}), 403, "DENIED")
        proxied = self.mirror(allow_clients=("10.0.0.0/8",), trusted_proxies=("127.0.0.1",))
        self.assertEqual(proxied.get(OK, {"X-Forwarded-For": "10.1.2.3"}).code, 200)
        self.assertRefused(proxied.get(OK, {"X-Forwarded-For": "192.0.2.9"}), 403, "DENIED")
        headers = proxied.second.seen[-1][2]
        self.assertEqual(headers["x-real-ip"], ["10.1.2.3"])

    def test_requests_in_flight_per_address(self) -> None:
        """Over the limit an address gets 429 with Retry-After; another address is unaffected."""
        mirror = self.mirror(
            max_requests_per_client=1, trusted_proxies=("127.0.0.1",), retry_after=7
        )
        mirror.second.hang = True
        busy = {"X-Forwarded-For": "10.0.0.1"}
        pending = mirror.client.get("https://mirror.test" + OK, headers=busy)
        mirror.settle()
        self.assertNoResult(pending)
        refused = mirror.get(OK, busy)
        self.assertRefused(refused, 429, "TOOMANYREQUESTS")
        self.assertEqual(refused.header("retry-after"), "7")
        mirror.second.hang = False
        self.assertEqual(mirror.get(OK, {"X-Forwarded-For": "10.0.0.2"}).code, 200)
        self.assertNoResult(pending)

    def test_health_check_is_never_refused(self) -> None:
        mirror = self.mirror(allow_clients=("10.0.0.0/8",))
        self.assertEqual(mirror.get("/healthz").code, 200)


class RepositoryPatternTests(SynchronousTestCase):
    def test_allow_and_deny_patterns(self) -> None:
        """Only allowed repositories are served; denied ones are 403 DENIED, never fetched."""
        hub = Registry(
            "docker.io",
            ("http://second.test",),
            "library",
            allow=("library/*",),
            deny=("library/secret*",),
        )
        mirror = MemoryMirror(self, Path(tempfile.mkdtemp()), registries={"docker.io": hub})
        self.assertEqual(mirror.get(OK).code, 200)
        for path in ("/v2/someone/app/manifests/latest", "/v2/secretsauce/manifests/latest"):
            with self.subTest(path=path):
                reply = mirror.get(path)
                self.assertEqual(reply.code, 403)
                self.assertEqual(reply.json()["errors"][0]["code"], "DENIED")
        self.assertEqual(mirror.second.counts["GET manifests"], 1)
