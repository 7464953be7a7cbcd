"""Hostile clients, generated: whatever a client sends to ``/v2/``, the
mirror answers it (no traceback, no hang, no 500), every error it answers
is the registry's JSON error, and a request it must refuse (a method other
than GET/HEAD, a malformed name, tag or digest, a registry it does not
serve, a malformed Range on a blob) reaches no upstream.

Requests are raw HTTP/1.1 bytes fed to the real site over a
``StringTransport``, so paths, methods and header values arrive exactly as
generated, not as an HTTP client library would clean them up. The in-memory
mirror (``tests.support.memory``) has the fake Docker Hub behind it.

CI runs a bounded, derandomized number of examples (profile ``ci``);
``HYPOTHESIS_PROFILE=long`` runs many more with fresh randomness (README,
"Fuzzing").
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import parse_qs
from zope.interface import provider

from mirrord.config import Access
from mirrord.front.login import make_hash
from tests.support.memory import MemoryMirror

settings.register_profile(
    "ci",
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    max_examples=20_000,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# --- what a client may send ------------------------------------------------

TCHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
VALID_TOKEN = "<a token the mirror's /token handed out>"
HEX = "0123456789abcdef"

methods = st.one_of(
    st.sampled_from(["GET", "HEAD"]),
    st.sampled_from(
        ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "get", "head", "BREW"]
    ),
    st.text(TCHARS, min_size=1, max_size=12),
)

component = st.from_regex(r"\A[a-z0-9]{1,8}(?:(?:\.|_|__|-{1,3})[a-z0-9]{1,8}){0,2}\Z")
valid_names = st.one_of(
    st.sampled_from(["alpine", "library/alpine", "alice/private", "library/nothere"]),
    st.lists(component, min_size=1, max_size=4).map("/".join),
)
hostile_text = st.text(
    st.one_of(
        st.sampled_from(list("./%_-:@?#~+ ABZaz09")),
        st.characters(codec="utf-8", exclude_categories=("Cs",)),
    ),
    max_size=40,
)
names = st.one_of(
    valid_names,
    st.sampled_from(
        [
            "",
            "..",
            "../..",
            "library/../alpine",
            "%2e%2e",
            "library%2Falpine",
            "Library/Alpine",
            "library//alpine",
            "library/alpine/",
            "-alpine",
            "alpine-",
            "a__b",
            "a___b",
            "a" * 256,
            "/".join(["a" * 60] * 5),
            "ünicode",
        ]
    ),
    hostile_text,
)
prefixes = st.sampled_from(
    [
        "",
        "docker.io/",
        "Docker.IO/",
        "index.docker.io/",
        "registry-1.docker.io/",
        "ghcr.io/",
        "localhost/",
        "127.0.0.1:5000/",
        "evil.example/",
    ]
)
sha256 = st.text(HEX, min_size=64, max_size=64).map("sha256:".__add__)
digests = st.one_of(
    sha256,
    st.sampled_from(
        [
            "sha256:",
            "sha256:ZZ",
            "sha256:" + "A" * 64,
            "sha256:" + "a" * 63,
            "sha256:" + "a" * 65,
            "sha512:" + "b" * 64,
            "sha512:" + "b" * 128,
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "sha256:../../etc/passwd",
            "sha256%3A" + "a" * 64,
        ]
    ),
    hostile_text.map("sha256:".__add__),
)
tags = st.one_of(
    st.sampled_from(["latest", "LATEST", "1.0", "v1_2-3", ".hidden", "-x", "a" * 128, "a" * 129]),
    st.from_regex(r"\A[\w][\w.-]{0,20}\Z").filter(str.isascii),
    hostile_text,
)
endings = st.one_of(
    st.tuples(st.just("manifests"), st.one_of(tags, digests)).map("/".join),
    st.tuples(st.just("blobs"), digests).map("/".join),
    st.just("tags/list"),
    st.sampled_from(["", "manifests", "blobs/", "tags", "blobs/uploads/", "_catalog"]),
    hostile_text,
)


@st.composite
def v2_paths(draw: st.DrawFn) -> str:
    """What follows ``/v2/``: mostly shaped like registry requests."""
    if draw(st.integers(0, 9)) == 0:
        return draw(hostile_text)
    ending = draw(endings)
    name = draw(names)
    path = draw(prefixes) + name + ("/" + ending if ending else "")
    return "" if draw(st.integers(0, 19)) == 0 else path


query_values = st.one_of(
    st.sampled_from(["docker.io", "DOCKER.IO", "ghcr.io", "index.docker.io", "", "10", "-1"]),
    st.from_regex(r"\A[0-9]{1,30}\Z"),
    hostile_text,
)
queries = st.lists(
    st.tuples(st.sampled_from(["ns", "n", "last", "scope", "x", "ns[]"]), query_values),
    max_size=4,
)

digits = st.from_regex(r"\A[0-9]{1,25}\Z") | st.integers(4300, 6000).map(lambda n: "9" * n)
ranges = st.one_of(
    st.tuples(digits, digits).map(lambda ab: f"bytes={ab[0]}-{ab[1]}"),
    digits.map(lambda a: f"bytes={a}-"),
    digits.map(lambda b: f"bytes=-{b}"),
    st.sampled_from(
        [
            "bytes=0-0",
            "bytes=0-1,2-3",
            "bytes=0-1, 5-",
            "bytes=",
            "bytes=-",
            "bytes=5-1",
            "bytes=-0",
            "bytes=0--1",
            "bytes= 0-1",
            "BYTES=0-1",
            "items=0-1",
            "bytes=0x10-20",
            "bytes=\u0661-\u0662",
            "garbage",
        ]
    ),
    hostile_text,
)
hosts = st.one_of(
    st.sampled_from(
        [
            "mirror.test",
            "mirror.test:443",
            "[::1]:443",
            "[::1",
            "ghcr.io",
            "evil.example",
            "",
            "<script>alert(1)</script>",
            "a" * 2000,
            "mirror.test:99999999",
        ]
    ),
    hostile_text,
)
authorizations = st.one_of(
    st.just(VALID_TOKEN),
    st.sampled_from(
        [
            "Bearer",
            "Bearer ",
            "Bearer fake.!!!",
            "Bearer fake.eyJ1c2VyIjogbnVsbH0=",
            "Basic",
            "Basic !!!",
            "Basic YWxpY2U6c2VjcmV0",
            "Basic b3BzOnMzY3JldA==",
            "Basic b3BzOndyb25n",
            "Basic YWxpY2U=",
            "Basic //79/w==",
            "Digest username=x",
            "bearer x",
        ]
    ),
    hostile_text,
)
forwarded = st.one_of(
    st.sampled_from(["127.0.0.1", "::1", "10.0.0.1, 192.0.2.1", ",,,", "unknown", "1.2.3.4.5"]),
    hostile_text,
)
accepts = st.one_of(
    st.sampled_from(
        [
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "*/*",
            "application/json;q=0.5, */*;q=0.1",
            ";;;",
        ]
    ),
    hostile_text,
)
header_sets = st.lists(
    st.one_of(
        st.tuples(st.just("Host"), hosts),
        st.tuples(st.just("Range"), ranges),
        st.tuples(st.just("Accept"), accepts),
        st.tuples(st.just("Authorization"), authorizations),
        st.tuples(st.just("X-Forwarded-For"), forwarded),
        st.tuples(
            st.just("Content-Type"),
            st.sampled_from(
                [
                    "application/x-www-form-urlencoded",
                    "multipart/form-data; boundary=x",
                    "multipart/form-data",
                    "application/json",
                ]
            )
            | hostile_text,
        ),
        st.tuples(st.just("Expect"), st.sampled_from(["100-continue", "x"])),
        st.tuples(
            st.sampled_from(["User-Agent", "If-None-Match", "X-Real-IP", "Cookie"]), hostile_text
        ),
        st.tuples(st.just("User-Agent"), st.sampled_from(["docker/27.0", "EvilBot/1.0", ""])),
    ),
    max_size=8,
)


@dataclass
class Hostile:
    """One request as a hostile client sends it."""

    method: str
    path: str  # after the root, unencoded
    query: list[tuple[str, str]]
    headers: list[tuple[str, str]]
    raw_target: bool  # send non-ASCII bytes in the target as they are
    root: str = "/v2/"
    body: bytes = b""  # sent with its Content-Length; "chunked" sends none

    @property
    def registry_api(self) -> bool:
        """Under /v2/ or /token, where every error is the registry's JSON."""
        return self.root in ("/v2/", "/token")

    def target(self) -> bytes:
        if self.raw_target:
            path = (self.root + self.path).encode("utf-8")
        else:
            path = quote(self.root + self.path, safe="/:@!$&'()*+,;=-._~%").encode("ascii")
        if self.query:
            path += b"?" + "&".join(f"{quote(k)}={quote(v)}" for k, v in self.query).encode()
        return path

    def wire(self, token: str) -> bytes:
        lines = [b"%s %s HTTP/1.1" % (self.method.encode(), self.target())]
        if not any(name == "Host" for name, _ in self.headers):
            lines.append(b"Host: mirror.test")
        for name, value in self.headers:
            value = token if value == VALID_TOKEN else value
            # Header values are bytes on the wire: obs-text (0x80-0xff) included.
            data = value.encode("utf-8").translate(None, b"\r\n\x00")
            lines.append(name.encode() + b": " + data)
        if self.body == b"chunked":
            # A body of unknown length, never sent: refused at once (413).
            lines.append(b"Transfer-Encoding: chunked")
        elif self.body:
            lines.append(b"Content-Length: %d" % len(self.body))
        lines.append(b"Connection: close")
        body = b"" if self.body == b"chunked" else self.body
        return b"\r\n".join(lines) + b"\r\n\r\n" + body


requests = st.builds(
    Hostile,
    method=methods,
    path=v2_paths(),
    query=queries,
    headers=header_sets,
    raw_target=st.integers(0, 19).map(lambda n: n == 0),
    root=st.one_of(
        st.just("/v2/"),
        st.sampled_from(["/v2/", "/v2/", "/v2/", "/token", "/", "/v2", "/healthz", "/x/"]),
    ),
    body=st.one_of(
        st.just(b""),
        st.sampled_from(
            [
                b"chunked",
                b"grant_type=password&username=alice&password=secret&service=fakehub",
                b"grant_type=refresh_token&refresh_token=%ff%00&scope=repository:x:pull",
                b"{}",
                b"x" * 70_000,
            ]
        ),
        st.binary(max_size=300),
    ),
)

# --- what a correct mirror must refuse itself --------------------------------

# The distribution spec's grammar (REGISTRY.md), written here independently
# of mirrord.registry.reference so the test can catch that module being too lenient.
SPEC_NAME = re.compile(
    r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*"
)
SPEC_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
SPEC_DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")
SINGLE_RANGE = re.compile(r"bytes=(?:(\d+)-(\d*)|-(\d+))")
DOCKER_HUB = {"docker.io", "index.docker.io", "registry-1.docker.io"}


def magnitude(digits: str) -> tuple[int, str]:
    """Orders decimal numbers of any length (int() stops at 4300 digits)."""
    digits = digits.lstrip("0") or "0"
    return len(digits), digits


def refusal(request: Hostile) -> str | None:
    """Why the mirror must answer this itself without asking an upstream,
    or None when it may ask one (README: routing; REGISTRY.md: grammar)."""
    target = request.target()
    if any(byte < 0x21 or byte > 0x7E for byte in target):
        return "not an HTTP request target"
    if request.root != "/v2/":
        return None  # /token may ask upstreams (for realms); the rest never does
    if request.method not in ("GET", "HEAD"):
        return "method"
    if request.raw_target:
        return None  # a raw '?' or '#' changes what the path is: no claim
    path = request.path
    raw = target.partition(b"?")[2]
    ns = parse_qs(raw, 1).get(b"ns")
    first, _, rest = path.partition("/")
    if ns is not None:
        if ns[-1].decode("latin-1").lower() not in DOCKER_HUB:
            return "registry not served"
        if first in DOCKER_HUB:
            path = rest
    elif rest and ("." in first or ":" in first or first == "localhost"):
        if first.lower() not in DOCKER_HUB:
            return "registry not served"
        path = rest
    if path == "":
        return None
    parts = path.split("/")
    if len(parts) < 3:
        return "no such endpoint"
    name = "/".join(parts[:-2])
    if parts[-2:] == ["tags", "list"]:
        return None if SPEC_NAME.fullmatch(name) and len(name) <= 255 else "name"
    if parts[-2] not in ("manifests", "blobs"):
        return "no such endpoint"
    if not SPEC_NAME.fullmatch(name) or len(name) > 255:
        return "name"
    ref = parts[-1]
    if parts[-2] == "blobs" or ":" in ref:
        if not SPEC_DIGEST.fullmatch(ref):
            return "digest"
    elif not SPEC_TAG.fullmatch(ref):
        return "tag"
    if parts[-2] == "blobs":
        values = [v.strip(" \t") for k, v in request.headers if k == "Range"]
        if values:
            found = SINGLE_RANGE.fullmatch(values[0]) if len(values) == 1 else None
            if found is None or not values[0].isascii():
                return "range"
            first_byte, last_byte = found.group(1), found.group(2)
            if first_byte and last_byte and magnitude(last_byte) < magnitude(first_byte):
                return "range"
    return None


# --- the harness ---------------------------------------------------------------


@dataclass
class RawReply:
    status: int
    headers: dict[str, list[str]]
    body: bytes
    complete: bool


def parse_reply(data: bytes, method: str) -> RawReply:
    while data.startswith(b"HTTP/1.1 100 "):  # interim (Expect: 100-continue)
        data = data.partition(b"\r\n\r\n")[2]
    head, sep, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.decode("latin-1").lower(), []).append(
            value.strip().decode("latin-1")
        )
    body = b"" if method == "HEAD" else rest
    if "chunked" in headers.get("transfer-encoding", []) and method != "HEAD":
        body, chunks = b"", rest
        while chunks:
            size_line, _, chunks = chunks.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            body, chunks = body + chunks[:size], chunks[size + 2 :]
            if size == 0:
                break
    elif "content-length" in headers and method != "HEAD":
        body = rest[: int(headers["content-length"][-1])]
    return RawReply(status, headers, body, bool(sep))


class Hostility(SynchronousTestCase):
    """Drives the in-memory mirror with raw requests and checks each answer."""

    access: Access | None = None

    def setUp(self) -> None:
        self.mirror = MemoryMirror(self, Path(tempfile.mkdtemp()), access=self.access)
        self.failures: list[LogEvent] = []

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            if event.get("log_failure") is not None:
                self.failures.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.token = self.login()

    def login(self) -> str:
        return "Bearer " + self.mirror.token("repository:library/alpine:pull")

    def upstream_requests(self) -> int:
        return sum(len(s.seen) + s.counts["token"] for s in (self.mirror.hub, self.mirror.second))

    def send(self, data: bytes, method: str) -> RawReply:
        """One request on a new connection; the answer once everything settled."""
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        channel = self.mirror.wiring.site.buildProtocol(peer)
        transport = StringTransport(IPv4Address("TCP", "127.0.0.1", 443), peer)
        channel.makeConnection(transport)
        try:
            channel.dataReceived(data)
            self.mirror.settle()
            self.mirror.clock.advance(1)
            self.mirror.settle()
            output = transport.value()
            self.assertTrue(output, f"no answer at all to {data[:300]!r}")
            reply = parse_reply(output, method)
            self.assertTrue(
                transport.disconnecting and reply.complete,
                f"answer never completed: {output[:300]!r}",
            )
            return reply
        finally:
            if not transport.disconnected:
                channel.connectionLost(Failure(ConnectionDone()))

    def check(self, request: Hostile) -> RawReply:
        self.failures.clear()
        before = self.upstream_requests()
        data = request.wire(self.token)
        reply = self.send(data, request.method)
        shown = data[:400]
        logged = [e["log_failure"].getTraceback() for e in self.failures]
        self.flushLoggedErrors()  # reported here, per example, not by trial at the end
        self.assertEqual(logged, [], f"logged for {shown!r}")
        self.assertLess(reply.status, 500, f"{shown!r} -> {reply}")
        if reply.status >= 400 and request.registry_api:
            self.assertEqual(
                reply.headers.get("content-type"), ["application/json"], f"{shown!r} -> {reply}"
            )
            if request.method != "HEAD":
                document: Any = json.loads(reply.body)
                self.assertIsInstance(document["errors"][0]["code"], str, reply.body)
                self.assertTrue(document["errors"][0]["code"], reply.body)
        why = refusal(request)
        if why is not None:
            self.assertGreaterEqual(reply.status, 400, f"{why}: {shown!r} -> {reply}")
            self.assertEqual(
                self.upstream_requests() - before, 0, f"{why} reached upstream: {shown!r}"
            )
        return reply


class FuzzTests(Hostility):
    @PROFILE
    @given(request=requests)
    def test_hostile_requests_get_registry_errors_and_never_reach_upstream(
        self, request: Hostile
    ) -> None:
        """Any generated request gets a complete non-500 answer, JSON when an
        error, and nothing upstream when the mirror must refuse it."""
        self.check(request)

    @PROFILE
    @given(
        range_values=st.lists(ranges, min_size=1, max_size=3),
        authorized=st.booleans(),
        method=st.sampled_from(["GET", "HEAD"]),
        which=st.integers(0, 10),
    )
    def test_blob_ranges(
        self, range_values: list[str], authorized: bool, method: str, which: int
    ) -> None:
        """A blob request with any Range header(s) gets a JSON error or exactly
        the bytes asked for, and a malformed one reaches no upstream."""
        blobs = sorted(self.mirror.alpine.blobs)
        digest = blobs[which % len(blobs)]
        headers = [("Range", value) for value in range_values]
        if authorized:
            headers.append(("Authorization", VALID_TOKEN))
        request = Hostile(method, f"library/alpine/blobs/{digest}", [], headers, False)
        reply = self.check(request)
        if reply.status == 206 and method == "GET":
            data = self.mirror.alpine.blobs[digest]
            span = reply.headers["content-range"][0].removeprefix("bytes ").partition("/")[0]
            first, _, last = span.partition("-")
            self.assertEqual(reply.body, data[int(first) : int(last) + 1])


class LoginFuzzTests(Hostility):
    """The same with the guard fully on: mirror login, an allow-list, a
    trusted proxy (so X-Forwarded-For counts), agent blocks and limits."""

    access = Access(
        users={"ops": make_hash("s3cret")},
        allow_clients=("127.0.0.0/8", "10.0.0.0/8", "::1"),
        trusted_proxies=("127.0.0.1",),
        block_user_agents=("[Ee]vil",),
        max_requests_per_client=4,
        max_connections_per_client=4,
    )

    def login(self) -> str:
        token = self.mirror.token("repository:library/alpine:pull", auth=("ops", "s3cret"))
        return "Bearer " + token

    @PROFILE
    @given(request=requests)
    def test_hostile_requests_with_mirror_login(self, request: Hostile) -> None:
        """With [access.users], any generated request still gets a complete
        non-500 answer, JSON when an error, nothing upstream when refused."""
        self.check(request)


class HostileRegressions(Hostility):
    """What the fuzz tests found, kept as plain tests."""

    def blob(self) -> tuple[str, bytes]:
        return max(self.mirror.alpine.blobs.items(), key=lambda kv: len(kv[1]))

    def blob_request(self, *ranges: str, authorized: bool = True) -> Hostile:
        digest, _ = self.blob()
        headers = [("Range", value) for value in ranges]
        if authorized:
            headers.append(("Authorization", VALID_TOKEN))
        return Hostile("GET", f"library/alpine/blobs/{digest}", [], headers, False)

    def assert_refused(self, request: Hostile, status: int, code: str) -> None:
        before = self.upstream_requests()
        reply = self.check(request)
        self.assertEqual(reply.status, status, reply)
        self.assertEqual(json.loads(reply.body)["errors"][0]["code"], code)
        self.assertEqual(self.upstream_requests(), before)

    def test_range_start_past_int_limit_is_unsatisfiable(self) -> None:
        """A Range whose first byte has 5000 digits gets 416 RANGE_INVALID, not a 500."""
        self.assert_refused(self.blob_request(f"bytes={'9' * 5000}-"), 416, "RANGE_INVALID")
        self.assert_refused(
            self.blob_request(f"bytes={'9' * 5000}-{'9' * 5001}"), 416, "RANGE_INVALID"
        )

    def test_range_end_past_int_limit_means_to_the_end(self) -> None:
        """A Range whose last byte (or suffix) has 5000 digits gets the blob's
        bytes to its end, from upstream and from the cache alike."""
        digest, data = self.blob()
        for _ in ("miss", "hit"):
            reply = self.check(self.blob_request(f"bytes=10-{'9' * 5000}"))
            self.assertEqual(reply.status, 206, reply)
            self.assertEqual(reply.body, data[10:])
            reply = self.check(self.blob_request(f"bytes=-{'9' * 5000}"))
            self.assertIn(reply.status, (200, 206), reply)
            self.assertEqual(reply.body, data)
            self.check(self.blob_request())  # fills the cache for the second round
        self.assertIsNotNone(self.mirror.store.get(digest))

    def test_several_range_headers_are_refused_before_upstream(self) -> None:
        """Two Range headers (a malformed one first) get 416 and neither reaches upstream."""
        self.assert_refused(self.blob_request("garbage", "bytes=0-1"), 416, "RANGE_INVALID")
        self.assert_refused(self.blob_request("bytes=0-1", "bytes=2-3"), 416, "RANGE_INVALID")

    def test_range_with_stray_whitespace_is_refused_before_upstream(self) -> None:
        """A Range value wrapped in a vertical tab is malformed: 416, nothing upstream."""
        self.assert_refused(self.blob_request("\x0bbytes=0-1"), 416, "RANGE_INVALID")

    def test_unparseable_requests_get_json_errors(self) -> None:
        """A request Twisted cannot parse (raw non-ASCII target; a header block
        over 16 KiB in lines under the limit) gets a JSON error, not a bare 400."""
        raw = Hostile("GET", "library/alpïne/manifests/latest", [], [], True)
        self.assert_refused(raw, 400, "UNSUPPORTED")
        many = [("User-Agent", "x" * 4000)] * 5
        self.assert_refused(Hostile("GET", "", [], many, False), 431, "UNSUPPORTED")

    def test_other_methods_on_every_page_get_json_405(self) -> None:
        """PUT, DELETE or an unknown method on /, /healthz or /metrics gets the
        registry's JSON 405, not Twisted's HTML 405 or 501."""
        for root in ("/", "/healthz", "/metrics"):
            for method in ("PUT", "DELETE", "BREW"):
                request = Hostile(method, "", [], [], False, root=root)
                self.assert_refused(request, 405, "UNSUPPORTED")
            self.assertEqual(self.check(Hostile("GET", "", [], [], False, root=root)).status, 200)

    def test_post_form_with_line_separator_in_content_type_gets_json_400(self) -> None:
        """A POST whose Content-Type holds a byte Python reads as a line break
        (0x85, 0x1c) gets a JSON 400, not an exception out of the parser."""
        for value in ("\x850", "x\x1cy"):
            for root in ("/token", "/v2/"):
                request = Hostile("POST", "", [], [("Content-Type", value)], False, root, b"a=b")
                self.assert_refused(request, 400, "UNSUPPORTED")
