"""Docker Hub's limits met head-on: the mirror's own account upstream,
tokens signed by the mirror for anonymous clients, and pulls that go on
through rate-limit rests and outages."""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mirrord.config import CacheConfig, Registry
from mirrord.tokens import MirrorTokens
from tests.support.images import OCI_MANIFEST
from tests.support.memory import MemoryMirror

ACCEPT = {"Accept": [OCI_MANIFEST]}
ALPINE = "/v2/library/alpine/manifests/latest"
PRIVATE = "/v2/alice/private/manifests/latest"


def hub_with_account(password: str = "pw", **extra) -> dict[str, Registry]:
    return {
        "docker.io": Registry(
            "docker.io", ("http://hub.test",), "library", username="mirror", password=password
        ),
        **extra,
    }


class AccountTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def mirror(self, cache: bool = True, **kwargs) -> MemoryMirror:
        mirror = MemoryMirror(
            self,
            Path(tempfile.mkdtemp()),
            registries=hub_with_account(),
            cache=CacheConfig(tag_ttl=0) if cache else None,
            **kwargs,
        )
        mirror.hub.users["mirror"] = "pw"
        return mirror

    def pull(
        self, mirror: MemoryMirror, path: str = ALPINE, name: str = "library/alpine", auth=None
    ):
        headers = {**ACCEPT, **mirror.pull_headers(name, auth=auth)}
        return mirror.get(path, headers)

    def test_anonymous_pulls_count_against_the_account(self) -> None:
        """An anonymous client's pull reaches the upstream as the mirror's account."""
        for cache in (True, False):
            with self.subTest(cache=cache):
                mirror = self.mirror(cache)
                reply = self.pull(mirror)
                self.assertEqual(reply.code, 200, reply.body)
                self.assertEqual(mirror.hub.pulls, {"mirror": 1})

    def test_token_service_is_not_asked_for_anonymous_tokens(self) -> None:
        """/token answers an anonymous client itself; the mirror's own upstream
        token is fetched once per scope and reused until it nears expiry."""
        mirror = self.mirror(cache=False)
        for _ in range(3):
            self.assertEqual(self.pull(mirror).code, 200)
        # The mirror's own token, once; and one anonymous one to check that
        # library/alpine is public (remembered for an hour).
        self.assertEqual(mirror.hub.counts["token mirror"], 1)
        self.assertEqual(mirror.hub.counts["token"], 2)
        mirror.clock.advance(300 - 30 + 1)  # the fake's tokens last 300 s
        self.assertEqual(self.pull(mirror).code, 200)
        self.assertEqual(mirror.hub.counts["token mirror"], 2)

    def test_refused_token_is_fetched_again(self) -> None:
        """When the upstream stops accepting the mirror's token, a new one is fetched."""
        mirror = self.mirror(cache=False)
        self.assertEqual(self.pull(mirror).code, 200)
        mirror.hub.epoch += 1  # every token issued so far is now refused
        self.assertEqual(self.pull(mirror).code, 200)
        self.assertEqual(mirror.hub.counts["token mirror"], 2)
        self.assertEqual(mirror.hub.pulls, {"mirror": 2})

    def test_account_never_opens_private_repositories_to_anonymous_clients(self) -> None:
        """The account can read alice/private; an anonymous client still gets
        the 401 it would get without the mirror, cache on or off, and alice
        with her own credentials gets her image."""
        for cache in (True, False):
            with self.subTest(cache=cache):
                mirror = self.mirror(cache)
                alice = self.pull(mirror, PRIVATE, "alice/private", ("alice", "secret"))
                self.assertEqual(alice.code, 200)
                anonymous = self.pull(mirror, PRIVATE, "alice/private")
                self.assertEqual(anonymous.code, 401)
                self.assertNotEqual(anonymous.body, alice.body)
                digest = alice.header("docker-content-digest")
                by_digest = self.pull(
                    mirror, f"/v2/alice/private/manifests/{digest}", "alice/private"
                )
                self.assertEqual(by_digest.code, 401)
                self.assertEqual(mirror.hub.pulls["mirror"], 0)

    def test_password_file_is_read_at_start_and_on_reload(self) -> None:
        """The password comes from its file; a reload reads the file again."""
        from mirrord.daemon.tap import reloader

        secret = Path(tempfile.mkdtemp()) / "token"
        secret.write_text("first\n")
        registry = Registry(
            "docker.io",
            ("http://hub.test",),
            "library",
            username="mirror",
            password_file=str(secret),
        )
        mirror = MemoryMirror(
            self, Path(tempfile.mkdtemp()), registries={"docker.io": registry}, cache=None
        )
        mirror.hub.users["mirror"] = "first"
        self.assertEqual(self.pull(mirror).code, 200)
        self.assertEqual(mirror.hub.pulls, {"mirror": 1})
        secret.write_text("second\n")
        mirror.hub.users["mirror"] = "second"
        mirror.hub.epoch += 1
        config = mirror.config
        chains = {name: target.chain for name, target in mirror.wiring.targets.items()}
        reload = reloader(lambda: config, config, _NoTLS(), chains)
        reload()
        self.assertEqual(self.pull(mirror).code, 200)
        self.assertEqual(mirror.hub.pulls, {"mirror": 2})

    def test_secrets_never_logged(self) -> None:
        """Neither the password nor any token appears in a log event."""
        mirror = self.mirror(cache=False)
        mirror.hub.users["mirror"] = "wrong-password-value"  # the token service refuses it
        reply = self.pull(mirror)
        self.assertNotEqual(reply.code, 200)
        mirror.hub.users["mirror"] = "pw"
        self.assertEqual(self.pull(mirror).code, 200)
        text = repr(self.events)
        self.assertNotIn("pw'", text)
        self.assertNotIn("fake.", text)
        self.assertNotIn("mirrord.ey", text)


class _NoTLS:
    """The reloader swaps this object's context; these tests have no TLS."""

    context = None


class TokensFromTheMirrorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.mirror = MemoryMirror(self, Path(tempfile.mkdtemp()), cache=CacheConfig(tag_ttl=0))
        self.hub = self.mirror.hub

    def test_v2_answers_the_same_whatever_the_upstream_state(self) -> None:
        """/v2/ is 401 without credentials and 200 with a token, up, resting or down."""
        headers = self.mirror.pull_headers("library/alpine")
        for state in ("up", "rate-limited", "down"):
            with self.subTest(state=state):
                self.hub.ratelimit = state == "rate-limited"
                self.hub.outage = state == "down"
                self.assertEqual(self.mirror.get("/v2/").code, 401)
                self.assertEqual(self.mirror.get("/v2/", headers).code, 200)

    def test_cached_pull_through_a_complete_outage(self) -> None:
        """Registry, CDN and token service all down: a new client's whole
        pull of cached content works with the usual token flow."""
        first = self.mirror.get(ALPINE, {**ACCEPT, **self.mirror.pull_headers("library/alpine")})
        self.assertEqual(first.code, 200)
        self.hub.outage = self.hub.auth_down = True
        self.hub.cdn_hold_at = 0  # the CDN would hang
        self.mirror.clock.advance(301)  # the first client's tokens are long gone
        headers = {**ACCEPT, **self.mirror.pull_headers("library/alpine")}
        stale = self.mirror.get(ALPINE, headers)
        self.assertEqual((stale.code, stale.header("x-mirrord-cache")), (200, "STALE"))
        digest = stale.header("docker-content-digest")
        by_digest = self.mirror.get(f"/v2/library/alpine/manifests/{digest}", headers)
        self.assertEqual((by_digest.code, by_digest.header("x-mirrord-cache")), (200, "HIT"))

    def test_pull_spanning_the_end_of_a_rest(self) -> None:
        """A client that starts its pull while the upstream rests after a 429
        goes on with the same token once the rest has ended."""
        self.hub.ratelimit, self.hub.retry_after = True, 30
        headers = {**ACCEPT, **self.mirror.pull_headers("library/alpine")}
        self.assertEqual(self.mirror.get(ALPINE, headers).code, 429)
        self.assertEqual(self.mirror.get("/v2/", headers).code, 200)
        self.hub.ratelimit = False
        self.mirror.clock.advance(31)
        reply = self.mirror.get(ALPINE, headers)
        self.assertEqual(reply.code, 200)
        blob = next(d for d in self.mirror.alpine.blobs if d != self.mirror.alpine.manifest_digest)
        self.assertEqual(self.mirror.get(f"/v2/library/alpine/blobs/{blob}", headers).code, 200)

    def test_mirror_tokens_are_scoped_and_short_lived(self) -> None:
        """A token covers the scopes asked for, for five minutes."""
        token = self.mirror.token("repository:library/alpine:pull")
        headers = {**ACCEPT, "Authorization": f"Bearer {token}"}
        self.assertEqual(self.mirror.get(ALPINE, headers).code, 200)
        other = self.mirror.get("/v2/library/busybox/manifests/latest", headers)
        self.assertEqual(other.code, 401)
        self.assertIn('error="insufficient_scope"', other.header("www-authenticate"))
        self.mirror.clock.advance(301)
        self.assertEqual(self.mirror.get(ALPINE, headers).code, 401)
        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        self.assertEqual(
            self.mirror.get(ALPINE, {**ACCEPT, "Authorization": f"Bearer {forged}"}).code, 401
        )
        self.assertEqual(self.hub.counts["token"], 1)  # only the mirror's own, once


class MirrorTokenFormatTests(SynchronousTestCase):
    def test_round_trip_and_tampering(self) -> None:
        now = [1000.0]
        tokens = MirrorTokens(b"k" * 32, lambda: now[0])
        token, lifetime = tokens.issue(["repository:library/alpine:pull"])
        grant = tokens.check(token)
        self.assertIsNotNone(grant)
        self.assertTrue(grant.allows_pull("library/alpine"))
        self.assertFalse(grant.allows_pull("library/busybox"))
        self.assertIsNone(MirrorTokens(b"x" * 32, lambda: now[0]).check(token))
        self.assertIsNone(tokens.check(token.replace(".", "!", 1)))
        now[0] += lifetime
        self.assertIsNone(tokens.check(token))


class OAuth2FormTests(SynchronousTestCase):
    def test_account_token_by_the_oauth2_form_where_get_is_refused(self) -> None:
        """A realm that refuses Basic on GET gets the OAuth2 password form."""
        mirror = MemoryMirror(
            self, Path(tempfile.mkdtemp()), registries=hub_with_account(), cache=None
        )
        mirror.hub.users["mirror"] = "pw"
        mirror.hub.token_post_only = True
        headers = {**ACCEPT, **mirror.pull_headers("library/alpine")}
        self.assertEqual(mirror.get(ALPINE, headers).code, 200)
        self.assertEqual(mirror.hub.pulls, {"mirror": 1})
        self.assertEqual(mirror.hub.counts["token mirror"], 1)  # the POST (the GET was refused)


class FreshDaemonTests(SynchronousTestCase):
    def test_docker_hub_is_known_to_use_tokens_before_it_answers(self) -> None:
        """A fresh daemon mirroring Docker Hub answers /v2/ with the mirror's
        challenge without asking Hub (down, or not yet asked)."""
        mirror = MemoryMirror(
            self, Path(tempfile.mkdtemp()), upstreams=("https://registry-1.docker.io",)
        )
        reply = mirror.get("/v2/")
        self.assertEqual(reply.code, 401)
        self.assertIn('service="registry.docker.io"', reply.header("www-authenticate"))
        token = mirror.get("/token?service=registry.docker.io&scope=repository:alpine:pull")
        self.assertEqual(token.code, 200)
        self.assertTrue(token.json()["token"].startswith("mirrord."))
