"""Parsing /v2/ paths and Bearer challenges."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mirrord.registry import reference
from mirrord.registry.challenges import (
    RealmBook,
    official_scope,
    parse_challenge,
    rewrite_challenges,
)
from mirrord.registry.errors import RegistryError
from mirrord.registry.reference import Kind


class ReferenceTests(SynchronousTestCase):
    def test_valid_paths(self) -> None:
        digest = "sha256:" + "a" * 64
        self.assertEqual(reference.parse(""), reference.Reference(Kind.BASE))
        parsed = reference.parse("library/alpine/manifests/3.20")
        self.assertEqual(
            (parsed.kind, parsed.name, parsed.reference), (Kind.MANIFEST, "library/alpine", "3.20")
        )
        parsed = reference.parse(f"a/b.c/d_e/blobs/{digest}")
        self.assertEqual(
            (parsed.kind, parsed.name, parsed.by_digest), (Kind.BLOB, "a/b.c/d_e", True)
        )
        self.assertEqual(reference.parse("alpine/tags/list").kind, Kind.TAGS)
        self.assertEqual(parsed.path("x/y"), f"/v2/x/y/blobs/{digest}")

    def test_errors_carry_codes(self) -> None:
        cases = {
            "UP/manifests/latest": "NAME_INVALID",
            "a//b/manifests/latest": "NAME_INVALID",
            "a/manifests/sha256:abc": "DIGEST_INVALID",
            "a/manifests/" + "t" * 129: "TAG_INVALID",
            "a/../b": "NAME_INVALID",
            "a/b": "NAME_UNKNOWN",
        }
        for path, code in cases.items():
            with self.subTest(path=path):
                self.assertEqual(self.assertRaises(RegistryError, reference.parse, path).code, code)


class ChallengeTests(SynchronousTestCase):
    HUB = (
        b'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        b'scope="repository:library/alpine:pull"'
    )

    def test_parse(self) -> None:
        challenge = parse_challenge(self.HUB)
        self.assertEqual(challenge.scheme, "Bearer")
        self.assertEqual(challenge.realm, "https://auth.docker.io/token")
        self.assertEqual(challenge.service, "registry.docker.io")
        self.assertEqual(challenge.params["scope"], "repository:library/alpine:pull")

    def test_rewrite_keeps_service_and_scope_and_learns_realm(self) -> None:
        book = RealmBook()
        [value] = rewrite_challenges([self.HUB], book, "https://m.example/token")
        self.assertEqual(
            value,
            b'Bearer realm="https://m.example/token",service="registry.docker.io",'
            b'scope="repository:library/alpine:pull"',
        )
        self.assertEqual(book.realm_for("registry.docker.io"), "https://auth.docker.io/token")
        self.assertIsNone(book.realm_for("other"))
        self.assertEqual(book.realm_for(None), "https://auth.docker.io/token")

    def test_basic_challenge_untouched(self) -> None:
        book = RealmBook()
        self.assertEqual(rewrite_challenges([b'Basic realm="x"'], book, "u"), [b'Basic realm="x"'])
        self.assertIsNone(book.realm_for(None))

    def test_official_scope(self) -> None:
        self.assertEqual(
            official_scope("repository:alpine:pull", "library"), "repository:library/alpine:pull"
        )
        self.assertEqual(official_scope("repository:a/b:pull", "library"), "repository:a/b:pull")
        self.assertEqual(official_scope("repository:alpine:pull", ""), "repository:alpine:pull")
        self.assertEqual(official_scope("registry:catalog:*", "library"), "registry:catalog:*")
