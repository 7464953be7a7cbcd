"""Not an open relay: each control refuses what it should, with the
registry's error, while a permitted request in the same mirror works."""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mirrord.config import Access, Registry
from mirrord.passwords import check_hash, make_hash
from tests.support.images import OCI_MANIFEST
from tests.support.memory import MemoryMirror

OK = "/v2/alpine/manifests/latest"
ACCEPT = {"Accept": [OCI_MANIFEST]}


class GuardTests(SynchronousTestCase):
    def mirror(self, **access: object) -> MemoryMirror:
        return MemoryMirror(
            self,
            Path(tempfile.mkdtemp()),
            upstreams=("http://second.test",),  # anonymous: no token dance needed
            access=Access(**access),  # type: ignore[arg-type]
            # Each request its own upstream request (the cache would share
            # a tag's HEAD between them).
            cache=None,
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
        """Over the limit an address gets 429 with Retry-After until one of its
        requests ends; another address is unaffected."""
        mirror = self.mirror(
            max_requests_per_client=2, trusted_proxies=("127.0.0.1",), retry_after=7
        )
        busy = {"X-Forwarded-For": "10.0.0.1"}

        def start():
            d = mirror.client.get("https://mirror.test" + OK, headers=busy)
            mirror.settle()
            self.assertNoResult(d)
            return d

        mirror.second.hang = True
        first, second = start(), start()
        self.assertEqual(len(mirror.second.hanging), 2)
        refused = mirror.get(OK, busy)
        self.assertRefused(refused, 429, "TOOMANYREQUESTS")
        self.assertEqual(refused.header("retry-after"), "7")
        self.assertEqual(len(mirror.second.hanging), 2, "a refused request went upstream")
        mirror.second.hang = False
        self.assertEqual(mirror.get(OK, {"X-Forwarded-For": "10.0.0.2"}).code, 200)
        # One of the two ends: the next request from that address is admitted.
        held = mirror.second.hanging.pop(0)
        held.setResponseCode(503)
        held.finish()
        mirror.settle()
        self.assertEqual(self.successResultOf(first).code, 503)
        self.assertNoResult(second)
        self.assertEqual(mirror.get(OK, busy).code, 200)
        # Still one in flight: one more is admitted, and the one after refused.
        mirror.second.hang = True
        third = start()
        self.assertRefused(mirror.get(OK, busy), 429, "TOOMANYREQUESTS")
        self.assertNoResult(second)
        self.assertNoResult(third)

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


class MirrorLoginTests(SynchronousTestCase):
    """Mirror login with basic auth, alongside the upstream's bearer tokens."""

    def setUp(self) -> None:
        users = {"ops": make_hash("s3cret")}
        self.anonymous_upstream = MemoryMirror(
            self,
            Path(tempfile.mkdtemp()),
            upstreams=("http://second.test",),
            access=Access(users=users),
        )
        self.hub = MemoryMirror(self, Path(tempfile.mkdtemp()), access=Access(users=users))

    def test_missing_and_wrong_credentials(self) -> None:
        """No credentials: 401 with a Basic challenge; wrong ones: 401; upstream never asked."""
        mirror = self.anonymous_upstream
        for auth in (None, ("ops", "wrong"), ("nobody", "s3cret")):
            with self.subTest(auth=auth):
                reply = mirror.get(OK, auth=auth)
                self.assertEqual(reply.code, 401)
                self.assertEqual(reply.json()["errors"][0]["code"], "UNAUTHORIZED")
                self.assertEqual(reply.header("www-authenticate"), 'Basic realm="mirrord"')
        self.assertEqual(mirror.second.counts["requests"], 0)

    def test_basic_credentials_never_go_upstream(self) -> None:
        mirror = self.anonymous_upstream
        self.assertEqual(mirror.get(OK, auth=("ops", "s3cret")).code, 200)
        self.assertTrue(all("authorization" not in h for _, _, h in mirror.second.seen))

    def test_bearer_flow_through_the_mirror_login(self) -> None:
        """Logged in, a client gets Hub's challenge, a token from /token, and pulls with it."""
        mirror = self.hub
        challenge = mirror.get("/v2/", auth=("ops", "s3cret"))
        self.assertEqual(challenge.code, 401)
        self.assertIn(
            'Bearer realm="https://mirror.test/token"', challenge.header("www-authenticate")
        )
        self.assertEqual(
            mirror.get("/token?service=fakehub&scope=repository:alpine:pull").code, 401
        )
        token = mirror.token("repository:alpine:pull", auth=("ops", "s3cret"))
        reply = mirror.get(OK, {"Authorization": f"Bearer {token}", **ACCEPT})
        self.assertEqual(reply.code, 200)
        forged = mirror.hub.token_for(None, ["library/alpine"])
        self.assertEqual(mirror.get(OK, {"Authorization": f"Bearer {forged}x"}).code, 401)

    def test_hash_command_output_is_accepted(self) -> None:
        stored = make_hash("pw")
        self.assertTrue(check_hash("pw", stored))
        self.assertFalse(check_hash("pW", stored))
