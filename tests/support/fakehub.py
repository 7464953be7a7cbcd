"""A fake Docker Hub, written with Twisted, for what no local registry does.

It has Hub's token service (anonymous and Basic-auth tokens, private
repositories), manifests with rate-limit headers, blob GETs that answer 307
to a separate CDN that refuses requests carrying ``Authorization``, a 429
mode with Hub's ``TOOMANYREQUESTS`` body, an outage mode and a hang mode.
It counts every request so tests can prove what reached upstream.

The same resources run in memory (behind ``RequestTraversalAgent``) and as a
process on loopback: ``python -m tests.support.fakehub --help``.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from twisted.internet.interfaces import IPushProducer
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from tests.support.images import Layout

TOOMANY = (
    b'{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate '
    b'limit. You may increase the limit by authenticating and upgrading"}]}'
)


def _headers(request: Request) -> dict[str, list[str]]:
    return {
        name.decode().lower(): [v.decode("latin-1") for v in values]
        for name, values in request.requestHeaders.getAllRawHeaders()
    }


def _error(request: Request, status: int, code: str, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


@dataclass
class HubState:
    """What the fake serves and how it misbehaves; shared by hub and CDN."""

    cdn_base: str = ""
    service: str = "fakehub"
    auth: bool = True
    users: dict[str, str] = field(default_factory=dict)
    private: set[str] = field(default_factory=set)
    tags: dict[str, dict[str, str]] = field(default_factory=dict)
    blob_files: dict[str, Path] = field(default_factory=dict)
    # Which digests each repository holds: like distribution, a digest is
    # served only under a repository that has it.
    contents: dict[str, set[str]] = field(default_factory=dict)
    # Users whose tokens the registry no longer accepts.
    revoked: set[str] = field(default_factory=set)
    # Tokens carry the epoch they were issued in; bumping it expires them all.
    epoch: int = 0
    # The token service is down (503) while the registry may be up.
    auth_down: bool = False
    # The token service takes credentials only in the OAuth2 form (POST).
    token_post_only: bool = False
    # Manifest GETs (pulls) counted per identity, as Hub does: the user a
    # token was issued to, or "anonymous"; each has ``quota`` pulls.
    pulls: Counter = field(default_factory=Counter)
    quota: int = 100
    enforce_quota: bool = False
    # When set, the CDN sends headers and this many bytes, then holds the
    # rest until ``release_cdn()``: a fill stays in progress.
    cdn_hold_at: int | None = None
    cdn_held: list[tuple[Request, Path, int, int]] = field(default_factory=list)
    # When set, the CDN closes the connection after this many bytes of a
    # longer blob body, for the next ``cdn_cuts`` bodies (negative: every one).
    # Ranged GETs are counted in ``counts["cdn ranged"]``.
    cdn_cut_at: int | None = None
    cdn_cuts: int = 1
    # The next this many ranged GETs are refused 403, as S3 refuses an
    # expired signed URL.
    cdn_refuse_ranged: int = 0
    media_types: dict[str, str] = field(default_factory=dict)
    ratelimit: bool = False
    retry_after: int | None = None
    outage: bool = False
    hang: bool = False
    remaining: int = 100
    counts: Counter = field(default_factory=Counter)
    seen: list[tuple[str, str, dict[str, list[str]]]] = field(default_factory=list)
    hanging: list[Request] = field(default_factory=list)

    def add(self, name: str, layout: Layout) -> None:
        self.tags.setdefault(name, {})[layout.tag] = layout.manifest_digest
        for path in (layout.path / "blobs" / "sha256").iterdir():
            digest = "sha256:" + path.name
            self.blob_files[digest] = path
            self.contents.setdefault(name, set()).add(digest)
            try:
                doc = json.loads(path.read_bytes()[:1_000_000])
                if isinstance(doc, dict) and "mediaType" in doc:
                    self.media_types[digest] = doc["mediaType"]
            except (ValueError, UnicodeDecodeError):
                pass

    def add_blob_file(self, digest: str, path: Path, name: str | None = None) -> None:
        """A blob of repository ``name``, or of every repository."""
        self.blob_files[digest] = path
        self.contents.setdefault(name or "*", set()).add(digest)

    def holds(self, name: str, digest: str) -> bool:
        """Does ``name`` have ``digest``? Repositories never given contents hold anything."""
        held = self.contents.get(name)
        return (
            held is None
            or digest in held
            or digest in self.contents.get("*", ())
            or digest not in self.blob_files
        )

    def release_cdn(self) -> None:
        held, self.cdn_held = self.cdn_held, []
        for request, path, offset, length in held:
            if not request._disconnected:
                FileRangeProducer(request, path, offset, length, self.counts).start()

    def token_for(self, user: str | None, repos: list[str]) -> str:
        payload = json.dumps({"user": user, "repos": repos, "epoch": self.epoch}).encode()
        return "fake." + base64.urlsafe_b64encode(payload).decode()

    def access(self, request: Request) -> tuple[str | None, list[str]] | None:
        value = request.getHeader(b"authorization") or b""
        if not value.startswith(b"Bearer fake."):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(value[len(b"Bearer fake.") :]))
            user, repos = data["user"], list(data["repos"])
            epoch = data.get("epoch", 0)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # a forged or mangled token grants nothing
        if epoch != self.epoch:
            return None  # expired
        return user, repos

    def identity(self, request: Request) -> str:
        access = self.access(request)
        return (access[0] if access else None) or "anonymous"


class HubToken(Resource):
    isLeaf = True

    def __init__(self, state: HubState) -> None:
        super().__init__()
        self.state = state

    def render(self, request: Request) -> bytes:
        self.state.counts["token"] += 1
        if self.state.auth_down:
            return _error(request, 503, "UNAVAILABLE", "token service unavailable")
        if self.state.token_post_only and request.method != b"POST":
            if request.getHeader(b"authorization"):
                return _error(request, 405, "UNSUPPORTED", "use the OAuth2 form")
        pairs = [(k.decode(), v.decode()) for k, vs in request.args.items() for v in vs]
        if request.method == b"POST":
            pairs += parse_qsl(request.content.read().decode("latin-1"))
        params: dict[str, list[str]] = {}
        for k, v in pairs:
            params.setdefault(k, []).append(v)
        self.state.counts["token-scopes"] += len(params.get("scope", []))
        user = self._user(request, params)
        self.state.counts[f"token {user or 'anonymous'}"] += 1
        if user is False:
            return _error(request, 401, "UNAUTHORIZED", "incorrect username or password")
        repos = []
        for scope in params.get("scope", []):
            kind, _, rest = scope.partition(":")
            name = rest.rpartition(":")[0]
            if kind != "repository":
                continue
            if name in self.state.private and user is None:
                continue
            repos.append(name)
        token = self.state.token_for(user or None, repos)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {
                "token": token,
                "access_token": token,
                "expires_in": 300,
                "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        ).encode()

    def _user(self, request: Request, params: dict[str, list[str]]) -> str | bool | None:
        user = password = None
        header = request.getHeader(b"authorization") or b""
        if header.startswith(b"Basic "):
            try:
                credentials = base64.b64decode(header[6:]).decode()
            except ValueError:  # not base64, or not UTF-8
                return False
            user, _, password = credentials.partition(":")
        elif "password" in params.get("grant_type", []):  # args and form may both hold it
            user, password = params["username"][0], params["password"][0]
        if user is None:
            return None
        return user if self.state.users.get(user) == password else False


class HubV2(Resource):
    isLeaf = True

    def __init__(self, state: HubState) -> None:
        super().__init__()
        self.state = state

    def _challenge(self, request: Request, scope: str | None) -> bytes:
        host = request.getHeader(b"host").decode()
        value = f'Bearer realm="http://{host}/token",service="{self.state.service}"'
        if scope:
            value += f',scope="{scope}"'
        request.setHeader(b"www-authenticate", value.encode())
        return _error(request, 401, "UNAUTHORIZED", "authentication required")

    def render(self, request: Request) -> bytes | int:
        state = self.state
        path = request.path.decode()
        parts = path[len("/v2/") :].split("/")
        kind = parts[-2] if len(parts) >= 3 else "base"
        state.counts[f"{request.method.decode()} {kind}"] += 1
        state.counts["requests"] += 1
        state.seen.append((request.method.decode(), path, _headers(request)))
        request.setHeader(b"docker-distribution-api-version", b"registry/2.0")
        if state.hang:
            state.hanging.append(request)
            return NOT_DONE_YET
        if state.outage:
            return _error(request, 503, "UNAVAILABLE", "service unavailable")
        access = state.access(request)
        if kind == "base":
            if state.auth and access is None:
                return self._challenge(request, None)
            request.setHeader(b"content-type", b"application/json")
            return b"{}"
        name = "/".join(parts[:-2])
        if access is not None and access[0] in state.revoked:
            access = None
        if state.auth and (access is None or name not in access[1]):
            return self._challenge(request, f"repository:{name}:pull")
        if name not in state.tags:
            return _error(request, 404, "NAME_UNKNOWN", f"repository {name} not known")
        if state.ratelimit and request.method == b"GET" and kind == "manifests":
            state.counts["429"] += 1
            if state.retry_after is not None:
                request.setHeader(b"retry-after", str(state.retry_after).encode())
            request.setResponseCode(429)
            request.setHeader(b"content-type", b"application/json")
            return TOOMANY
        if kind == "manifests":
            return self._manifest(request, name, parts[-1])
        if kind == "blobs":
            if not state.holds(name, parts[-1]):
                return _error(request, 404, "BLOB_UNKNOWN", f"blob unknown: {parts[-1]}")
            return self._blob(request, parts[-1])
        if kind == "tags":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"name": name, "tags": sorted(state.tags[name])}).encode()
        return _error(request, 404, "NOT_FOUND", path)

    def _manifest(self, request: Request, name: str, ref: str) -> bytes:
        state = self.state
        digest = ref if ref.startswith("sha256:") else state.tags[name].get(ref)
        if digest is None or digest not in state.media_types or not state.holds(name, digest):
            return _error(request, 404, "MANIFEST_UNKNOWN", f"manifest unknown: {ref}")
        body = state.blob_files[digest].read_bytes()
        identity = state.identity(request)
        if request.method == b"GET":
            if state.enforce_quota and state.pulls[identity] >= state.quota:
                request.setHeader(b"ratelimit-remaining", b"0;w=21600")
                request.setResponseCode(429)
                request.setHeader(b"content-type", b"application/json")
                return TOOMANY
            state.remaining -= 1
            state.pulls[identity] += 1
        request.setHeader(b"content-type", state.media_types[digest].encode())
        request.setHeader(b"docker-content-digest", digest.encode())
        request.setHeader(b"etag", f'"{digest}"'.encode())
        request.setHeader(b"content-length", str(len(body)).encode())
        request.setHeader(b"ratelimit-limit", b"100;w=21600")
        left = state.quota - state.pulls[identity] if state.enforce_quota else state.remaining
        request.setHeader(b"ratelimit-remaining", f"{left};w=21600".encode())
        request.setHeader(b"docker-ratelimit-source", b"127.0.0.1")
        return body

    def _blob(self, request: Request, digest: str) -> bytes:
        path = self.state.blob_files.get(digest)
        if path is None:
            return _error(request, 404, "BLOB_UNKNOWN", f"blob unknown: {digest}")
        hexdigest = digest.split(":", 1)[1]
        location = (
            f"{self.state.cdn_base}/registry-v2/docker/registry/v2/blobs/sha256/"
            f"{hexdigest[:2]}/{hexdigest}/data?verify=1700000000-signature"
        )
        request.setResponseCode(307)
        request.setHeader(b"location", location.encode())
        request.setHeader(b"content-length", b"0")
        return b""


def _number(digits: bytes) -> int | None:
    """A Range bound; absurdly long ones are just very large."""
    if not digits:
        return None
    return int(digits) if len(digits) <= 30 else 10**30


class Cdn(Resource):
    """Serves blobs by path like Hub's CDN; rejects a second auth mechanism."""

    isLeaf = True

    def __init__(self, state: HubState) -> None:
        super().__init__()
        self.state = state

    def render(self, request: Request) -> bytes | int:
        self.state.counts[f"cdn {request.method.decode()}"] += 1
        self.state.seen.append((request.method.decode(), request.uri.decode(), _headers(request)))
        if request.getHeader(b"authorization") is not None:
            self.state.counts["cdn rejected auth"] += 1
            request.setResponseCode(400)
            return (
                b"<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism"
                b" allowed</Message></Error>"
            )
        if not request.args.get(b"verify"):
            request.setResponseCode(403)
            return b"<Error><Code>AccessDenied</Code></Error>"
        hexdigest = request.path.decode().rstrip("/").split("/")[-2]
        path = self.state.blob_files.get("sha256:" + hexdigest)
        if path is None:
            request.setResponseCode(404)
            return b"<Error><Code>NoSuchKey</Code></Error>"
        size = path.stat().st_size
        first, last = 0, size - 1
        spec = re.fullmatch(rb"bytes=(\d*)-(\d*)", request.getHeader(b"range") or b"")
        if spec is not None and spec.group(0) != b"bytes=-":  # else ignored, as RFC 9110 says
            self.state.counts["cdn ranged"] += 1
            if self.state.cdn_refuse_ranged > 0:
                self.state.cdn_refuse_ranged -= 1
                request.setResponseCode(403)
                return b"<Error><Code>AccessDenied</Code><Message>expired</Message></Error>"
            start, end = (_number(n) for n in spec.groups())
            first = start if start is not None else max(0, size - (end or 0))
            last = min(end, size - 1) if start is not None and end is not None else size - 1
            if first >= size or first > last:
                request.setResponseCode(416)
                request.setHeader(b"content-range", f"bytes */{size}".encode())
                return b""
            request.setResponseCode(206)
            request.setHeader(b"content-range", f"bytes {first}-{last}/{size}".encode())
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"etag", b'"cdn-etag-not-a-digest"')
        request.setHeader(b"content-length", str(last - first + 1).encode())
        if request.method == b"HEAD":
            return b""
        hold = self.state.cdn_hold_at
        if hold is not None and last - first + 1 > hold:
            with path.open("rb") as f:
                f.seek(first)
                request.write(f.read(hold))
            self.state.cdn_held.append((request, path, first + hold, last - first + 1 - hold))
            return NOT_DONE_YET
        cut = None
        cut_at = self.state.cdn_cut_at
        if cut_at is not None and last - first + 1 > cut_at and self.state.cdn_cuts != 0:
            cut = self.state.cdn_cut_at
            self.state.cdn_cuts -= 1 if self.state.cdn_cuts > 0 else 0
            self.state.counts["cdn cuts"] += 1
        FileRangeProducer(request, path, first, last - first + 1, self.state.counts, cut).start()
        return NOT_DONE_YET


@implementer(IPushProducer)
class FileRangeProducer:
    """Writes part of a file to a request, honouring backpressure, with no
    reactor of its own (so it also runs in memory). Counts the bytes it has
    handed to the connection in ``counts["cdn bytes"]``: what a test sees
    of how far the upstream has got."""

    chunk = 256 * 1024

    def __init__(
        self,
        request: Request,
        path: Path,
        offset: int,
        length: int,
        counts: Counter | None = None,
        cut_at: int | None = None,
    ) -> None:
        self.counts = counts
        # Close the connection after this many bytes: a cut transfer.
        self.cut_at = cut_at
        self.request = request
        self.file = path.open("rb")
        self.file.seek(offset)
        self.left = length
        self.paused = False
        self.stopped = False

    def start(self) -> None:
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._produce()

    def _produce(self) -> None:
        while not self.paused and not self.stopped and self.left > 0:
            size = min(self.chunk, self.left)
            if self.cut_at is not None:
                size = min(size, self.cut_at)
            data = self.file.read(size)
            self.left -= len(data)
            if self.counts is not None:
                self.counts["cdn bytes"] += len(data)
            self.request.write(data)
            if self.cut_at is not None:
                self.cut_at -= len(data)
                if self.cut_at == 0:
                    self.stopped = True
                    self.file.close()
                    self.request.unregisterProducer()
                    self.request.channel.transport.loseConnection()
                    return
        if self.left == 0 and not self.stopped:
            self.stopped = True
            self.file.close()
            self.request.unregisterProducer()
            self.request.finish()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._produce()

    def stopProducing(self) -> None:
        self.stopped = True
        self.file.close()


class Control(Resource):
    """``GET /_control`` reads the counters; ``POST`` sets modes from JSON."""

    isLeaf = True

    def __init__(self, state: HubState) -> None:
        super().__init__()
        self.state = state

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        state = self.state
        return json.dumps(
            {"counts": dict(state.counts), "seen": state.seen, "pulls": dict(state.pulls)}
        ).encode()

    def render_POST(self, request: Request) -> bytes:
        changes = json.loads(request.content.read() or b"{}")
        for key, value in changes.items():
            if key == "reset_counts":
                self.state.counts.clear()
            elif key == "release_cdn":
                self.state.release_cdn()
            elif isinstance(getattr(self.state, key, None), Counter):
                setattr(self.state, key, Counter(value))
            else:
                setattr(self.state, key, value)
        if not self.state.hang:
            for hung in self.state.hanging:
                if not hung.finished and not hung._disconnected:
                    hung.setResponseCode(503)
                    hung.finish()
            self.state.hanging.clear()
        return b"{}"


def hub_resource(state: HubState) -> Resource:
    root = Resource()
    root.putChild(b"v2", HubV2(state))
    root.putChild(b"token", HubToken(state))
    root.putChild(b"_control", Control(state))
    return root


class ByHost(Resource):
    """Dispatches on the Host header: lets hub and CDN share one in-memory agent."""

    isLeaf = True

    def __init__(self, hosts: dict[bytes, Resource]) -> None:
        super().__init__()
        self.hosts = hosts

    def render(self, request: Request) -> bytes | int:
        host = (request.getHeader(b"host") or b"").split(b":")[0]
        return getChildForRequest(self.hosts[host], request).render(request)


def main(argv: list[str]) -> None:
    from twisted.internet import reactor
    from twisted.web.server import Site

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cdn-port", type=int, required=True)
    parser.add_argument("--no-auth", action="store_true")
    parser.add_argument("--image", action="append", default=[], help="NAME=OCI-LAYOUT-DIR:TAG")
    parser.add_argument("--private", action="append", default=[])
    parser.add_argument("--user", action="append", default=[], help="USER:PASSWORD")
    parser.add_argument("--blob", action="append", default=[], help="DIGEST=FILE")
    args = parser.parse_args(argv)
    state = HubState(cdn_base=f"http://127.0.0.1:{args.cdn_port}", auth=not args.no_auth)
    for spec in args.image:
        name, _, rest = spec.partition("=")
        path, _, tag = rest.rpartition(":")
        index = json.loads((Path(path) / "index.json").read_text())
        layout = Layout(Path(path), tag, index["manifests"][0]["digest"])
        state.add(name, layout)
    state.private.update(args.private)
    state.users.update(dict(u.split(":", 1) for u in args.user))
    for spec in args.blob:
        digest, _, path = spec.partition("=")
        state.add_blob_file(digest, Path(path))
    reactor.listenTCP(args.port, Site(hub_resource(state)), interface="127.0.0.1")
    reactor.listenTCP(args.cdn_port, Site(Cdn(state)), interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
