"""Pulling an image through a mirror the way a client does, and
``python -m mirrord.warm``: one such pull of each named image against a
running mirror.

A pull is what docker, containerd and skopeo do: ``GET /v2/`` (a 401 sends
it to the challenge's realm for an anonymous token, scoped to the one
repository), the manifest by tag with an ``Accept`` that lists every
manifest type, every platform's manifest when that is an index or a
manifest list, then every config and layer blob. So a mirror warmed this
way has counted, verified and rate-limited the pull exactly as it would a
client's; nothing here knows how the mirror works inside.

Blob bodies are read and thrown away as they stream (memory stays flat
whatever their size), a few at a time; every wait is bounded on the
injected clock. Manifests are checked against their digest; blobs too when
``verify`` is on (the CLI, where hashing is the client's own CPU; the
daemon warming itself leaves that to the cache, which verifies every blob
before it keeps it, and spares its reactor thread the second hash).

The requests go through ``twisted.web.client.Agent`` itself, not
``treq.request``, which would send ``Accept-Encoding: gzip`` and decode
(README, "Why Agent and not treq.request").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import urlencode, urljoin, urlsplit

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredSemaphore,
    FirstError,
    gatherResults,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from mirrord.registry.challenges import parse_challenge
from mirrord.registry.imageref import Image, parse_image
from mirrord.registry.reference import DIGEST_RE

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPES = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})

USER_AGENT = "mirrord-warm/1"
MANIFEST_LIMIT = 4 << 20  # distribution refuses manifests over 4 MiB
SMALL_LIMIT = 64 << 10  # tokens, /v2/, error bodies
MAX_REDIRECTS = 5


class WarmError(Exception):
    """Why an image could not be pulled, in one line a person can act on."""


@dataclass
class Pulled:
    """What one pull read."""

    image: Image
    manifests: int = 0
    blobs: int = 0
    bytes: int = 0


# progress(image, what, digest, size): what is "manifest" or "blob", after it is read.
Progress = Callable[[Image, str, str, int], None]


def _no_progress(image: Image, what: str, digest: str, size: int) -> None:
    pass


class _Body(Protocol):
    """Reads a body with an idle timer: keeps it (up to ``limit``) or only
    counts and hashes it. ``done`` fires with the kept bytes."""

    def __init__(
        self, clock: IReactorTime, idle: float, limit: int | None, keep: bool, hash_it: bool
    ) -> None:
        self.clock = clock
        self.idle = idle
        self.limit = limit
        self.keep = keep
        self.size = 0
        self.parts: list[bytes] = []
        self.hasher = hashlib.sha256() if hash_it else None
        self.done: Deferred[bytes] = Deferred(self._cancel)
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._timer = self.clock.callLater(self.idle, self._stalled)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.idle)
        self.size += len(data)
        if self.limit is not None and self.size > self.limit:
            self._fail(WarmError(f"body over {self.limit} bytes"))
            return
        if self.keep:
            self.parts.append(data)
        if self.hasher is not None:
            self.hasher.update(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._stop_timer()
        if self.done.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(WarmError(f"body cut after {self.size} bytes: {reason.value}"))

    def digest(self) -> str:
        assert self.hasher is not None
        return "sha256:" + self.hasher.hexdigest()

    def _stalled(self) -> None:
        self._fail(WarmError(f"timed out: no body bytes for {self.idle:g}s"))

    def _fail(self, error: Exception) -> None:
        self._stop_timer()
        if not self.done.called:
            self.done.errback(error)
        if self.transport is not None:
            self.transport.stopProducing()

    def _cancel(self, d: Deferred[bytes]) -> None:
        self._stop_timer()
        if self.transport is not None:
            self.transport.stopProducing()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()


def _digest_of(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


class Puller:
    """Pulls images through the mirror at ``base`` (``https://host:port``).

    ``stop()`` cancels every request and body in flight; the pulls under
    way fail with ``CancelledError``.
    """

    def __init__(
        self,
        agent: IAgent,
        clock: IReactorTime,
        base: str,
        *,
        concurrency: int = 4,
        timeout: float = 30.0,
        idle: float = 60.0,
        verify: bool = True,
        progress: Progress = _no_progress,
    ) -> None:
        self.agent = agent
        self.clock = clock
        self.base = base.rstrip("/")
        self.timeout = timeout
        self.idle = idle
        self.verify = verify
        self.progress = progress
        self._slots = DeferredSemaphore(concurrency)
        self._in_flight: set[Deferred[Any]] = set()
        self._stopped = False

    def pull(self, image: Image) -> Deferred[Pulled]:
        return self._track(Deferred.fromCoroutine(self._pull(image)))

    @property
    def stopped(self) -> bool:
        return self._stopped

    def stop(self) -> None:
        self._stopped = True
        for d in list(self._in_flight):
            d.cancel()

    def _track(self, d: Deferred[Any]) -> Deferred[Any]:
        self._in_flight.add(d)

        def untrack(result: object) -> object:
            self._in_flight.discard(d)
            return result

        return d.addBoth(untrack)

    async def _pull(self, image: Image) -> Pulled:
        pulled = Pulled(image)
        auth = await self._authorize(image.name)
        body, media_type, digest = await self._manifest(image, image.reference, auth)
        pulled.manifests += 1
        self.progress(image, "manifest", digest, len(body))
        document = _json(body, f"manifest {image}")
        if media_type in INDEX_TYPES or "manifests" in document:
            children = [_descriptor(entry, "manifests") for entry in document.get("manifests", [])]
            documents = []
            for child in children:
                child_body, _, _ = await self._manifest(image, child, auth)
                pulled.manifests += 1
                self.progress(image, "manifest", child, len(child_body))
                documents.append(_json(child_body, f"manifest {child}"))
        else:
            documents = [document]
        blobs: dict[str, int] = {}
        for doc in documents:
            for entry in [doc.get("config"), *doc.get("layers", [])]:
                if entry is not None:
                    blobs[_descriptor(entry, "blob")] = int(entry.get("size", -1))
        sizes = await gatherResults(
            [
                self._track(self._slots.run(self._blob_later, image, digest, size, auth))
                for digest, size in blobs.items()
            ],
            consumeErrors=True,
        )
        pulled.blobs = len(sizes)
        pulled.bytes = sum(sizes)
        return pulled

    async def _authorize(self, name: str) -> Headers:
        """The headers a pull of ``name`` carries: an anonymous token from the
        realm ``/v2/`` names, if it names one."""
        response = await self._request(b"GET", f"{self.base}/v2/", Headers())
        await self._small(response)
        if response.code == 200:
            return Headers()
        challenges = response.headers.getRawHeaders(b"www-authenticate") or []
        bearer = [c for c in map(parse_challenge, challenges) if c and c.scheme.lower() == "bearer"]
        if response.code != 401 or not bearer or not bearer[0].realm:
            raise WarmError(f"GET /v2/: {response.code} {_phrase(response)}")
        challenge = bearer[0]
        query = {"scope": f"repository:{name}:pull"}
        if challenge.service:
            query["service"] = challenge.service
        realm = challenge.realm
        url = f"{realm}{'&' if '?' in realm else '?'}{urlencode(query)}"
        response = await self._request(b"GET", url, Headers())
        body = await self._small(response)
        if response.code != 200:
            raise WarmError(f"token from {realm}: {response.code} {_error_text(body, response)}")
        answer = _json(body, "token answer")
        token = answer.get("token") or answer.get("access_token")
        if not isinstance(token, str) or not token:
            raise WarmError(f"token from {realm}: no token in the answer")
        return Headers({b"authorization": [f"Bearer {token}".encode()]})

    async def _manifest(
        self, image: Image, reference: str, auth: Headers
    ) -> tuple[bytes, str, str]:
        headers = auth.copy()
        headers.setRawHeaders(b"accept", [", ".join(MANIFEST_TYPES).encode()])
        url = f"{self.base}/v2/{image.name}/manifests/{reference}"
        response = await self._request(b"GET", url, headers)
        body = await self._read(response, MANIFEST_LIMIT, keep=True)
        if response.code != 200:
            raise WarmError(f"manifest {reference}: {response.code} {_error_text(body, response)}")
        digest = _digest_of(body)
        expected = reference if ":" in reference else _header(response, b"docker-content-digest")
        if expected and expected != digest:
            raise WarmError(f"manifest {reference}: got {digest}, expected {expected}")
        media_type = (_header(response, b"content-type") or "").split(";")[0].strip()
        return body, media_type, digest

    def _blob_later(self, image: Image, digest: str, size: int, auth: Headers) -> Deferred[int]:
        return Deferred.fromCoroutine(self._blob(image, digest, size, auth))

    async def _blob(self, image: Image, digest: str, size: int, auth: Headers) -> int:
        url = f"{self.base}/v2/{image.name}/blobs/{digest}"
        response = await self._request(b"GET", url, auth)
        if response.code != 200:
            body = await self._small(response)
            raise WarmError(f"blob {digest}: {response.code} {_error_text(body, response)}")
        reader = _Body(self.clock, self.idle, None, keep=False, hash_it=self.verify)
        response.deliverBody(reader)
        await self._track(reader.done)
        if size >= 0 and reader.size != size:
            raise WarmError(f"blob {digest}: {reader.size} bytes, the manifest says {size}")
        if self.verify and reader.digest() != digest:
            raise WarmError(f"blob {digest}: the bytes hash to {reader.digest()}")
        self.progress(image, "blob", digest, reader.size)
        return reader.size

    async def _request(self, method: bytes, url: str, headers: Headers) -> IResponse:
        """One request, following redirects (``Authorization`` only to the
        same origin), with the response headers due within ``timeout``."""
        for _ in range(MAX_REDIRECTS + 1):
            if self._stopped:
                raise CancelledError()
            sent = headers.copy()
            sent.setRawHeaders(b"user-agent", [USER_AGENT.encode()])
            response = await self._send(method, url, sent)
            location = _header(response, b"location")
            if response.code not in (301, 302, 303, 307, 308) or not location:
                return response
            await self._small(response)
            target = urljoin(url, location)
            if _origin(target) != _origin(url):
                headers = Headers(
                    {k: v for k, v in headers.getAllRawHeaders() if k.lower() != b"authorization"}
                )
            url = target
        raise WarmError(f"more than {MAX_REDIRECTS} redirects from {url}")

    async def _send(self, method: bytes, url: str, headers: Headers) -> IResponse:
        """The response headers within ``timeout``. Cancelling the Agent's
        request fails it with ``ResponseNeverReceived`` (the cancel inside),
        so a timeout and a stop are told apart here."""
        d = self.agent.request(method, url.encode(), headers)
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            d.cancel()

        timer = self.clock.callLater(self.timeout, expire)
        try:
            return await self._track(d)
        except Exception:
            if expired:
                raise WarmError(f"timed out: no answer to {url} in {self.timeout:g}s") from None
            if self._stopped:
                raise CancelledError() from None
            raise
        finally:
            if timer.active():
                timer.cancel()

    async def _small(self, response: IResponse) -> bytes:
        return await self._read(response, SMALL_LIMIT, keep=True)

    async def _read(self, response: IResponse, limit: int, keep: bool) -> bytes:
        reader = _Body(self.clock, self.idle, limit, keep=keep, hash_it=False)
        response.deliverBody(reader)
        return await self._track(reader.done)


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def _header(response: IResponse, name: bytes) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[-1].decode("latin-1") if values else None


def _phrase(response: IResponse) -> str:
    return response.phrase.decode("latin-1") if response.phrase else ""


def _error_text(body: bytes, response: IResponse) -> str:
    """The registry's own error message when the body is one."""
    try:
        errors = json.loads(body)["errors"]
        return "; ".join(f"{e.get('code', '')}: {e.get('message', '')}" for e in errors)
    except (ValueError, KeyError, TypeError, AttributeError):
        return _phrase(response)


def _json(body: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except ValueError:
        raise WarmError(f"{what}: not JSON") from None
    if not isinstance(document, dict):
        raise WarmError(f"{what}: not a JSON object")
    return document


def _descriptor(entry: Any, what: str) -> str:
    digest = entry.get("digest") if isinstance(entry, dict) else None
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise WarmError(f"a {what} entry without a valid digest: {entry!r:.80}")
    return digest


def reason(failure: Failure) -> str:
    """One line for why a pull failed."""
    if failure.check(FirstError):
        failure = failure.value.subFailure
    if failure.check(WarmError):
        return str(failure.value)
    if failure.check(ResponseNeverReceived, ResponseFailed):
        return f"{type(failure.value).__name__}: " + ", ".join(
            str(f.value) or type(f.value).__name__ for f in failure.value.reasons
        )
    if failure.check(CancelledError):
        return "cancelled"
    return f"{type(failure.value).__name__}: {failure.value}"


def pull_all(puller: Puller, images: Iterable[Image]) -> Deferred[dict[Image, Pulled | Failure]]:
    """Each image in turn (a failure does not stop the next): image -> what
    was pulled, or the failure."""

    async def run() -> dict[Image, Pulled | Failure]:
        results: dict[Image, Pulled | Failure] = {}
        for image in images:
            try:
                results[image] = await puller.pull(image)
            except Exception:
                # A stop surfaces as whatever the request was doing
                # (ResponseNeverReceived wrapping the cancel, say).
                if puller.stopped:
                    raise CancelledError() from None
                results[image] = Failure()
        return results

    return Deferred.fromCoroutine(run())


# python -m mirrord.warm


class Terminal:
    """Progress on a terminal: one line rewritten in place on a TTY, one line
    per manifest and blob otherwise (a log, a CI job)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.total = 0

    def progress(self, image: Image, what: str, digest: str, size: int) -> None:
        self.total += size
        if self.tty:
            line = f"{image}: {what} {digest[:19]} {size} bytes (total {self.total})"
            self.out.write("\r\x1b[K" + line)
        else:
            self.out.write(f"{image}: {what} {digest} {size} bytes\n")
        self.out.flush()

    def done(self, image: Image, result: Pulled | Failure) -> None:
        if self.tty:
            self.out.write("\r\x1b[K")
        if isinstance(result, Pulled):
            self.out.write(
                f"{image}: ok, {result.manifests} manifests, {result.blobs} blobs, "
                f"{result.bytes} bytes\n"
            )
        else:
            self.out.write(f"{image}: FAILED: {reason(result)}\n")
        self.out.flush()


def _arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mirrord.warm",
        description="Pull images through a running mirror (every platform of each) "
        "so they are in its cache; exit 0 if every image was pulled.",
    )
    trust = parser.add_mutually_exclusive_group()
    trust.add_argument("--ca", metavar="FILE", help="PEM CA certificates to trust for the mirror")
    trust.add_argument(
        "--insecure", action="store_true", help="do not verify the mirror's certificate"
    )
    parser.add_argument("--concurrency", type=int, default=4, help="blobs at once (default 4)")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds for a response or a stalled body"
    )
    parser.add_argument("mirror", help="the mirror's URL, e.g. https://mirror.example.com")
    parser.add_argument("images", nargs="+", help="name:tag or name@sha256:...")
    args = parser.parse_args(argv)
    if urlsplit(args.mirror).scheme not in ("https", "http") or not urlsplit(args.mirror).netloc:
        parser.error(f"{args.mirror!r} is not a URL like https://mirror.example.com")
    try:
        args.images = [parse_image(text) for text in args.images]
    except ValueError as e:
        parser.error(str(e))
    if args.concurrency < 1 or args.timeout <= 0:
        parser.error("--concurrency and --timeout must be positive")
    return args


def _policy(args: argparse.Namespace) -> Any:
    from twisted.internet.ssl import Certificate, optionsForClientTLS, trustRootFromCertificates
    from twisted.web.client import BrowserLikePolicyForHTTPS
    from twisted.web.iweb import IPolicyForHTTPS
    from zope.interface import implementer

    if args.ca:
        with open(args.ca, "rb") as f:
            pem = f.read()
        certificates = [
            Certificate.loadPEM(b"-----BEGIN CERTIFICATE-----" + part)
            for part in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]
        ]
        root = trustRootFromCertificates(certificates)

        @implementer(IPolicyForHTTPS)
        class Trusting:
            def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
                return optionsForClientTLS(hostname.decode("ascii"), trustRoot=root)

        return Trusting()
    if args.insecure:
        from twisted.internet.ssl import CertificateOptions

        @implementer(IPolicyForHTTPS)
        class Insecure:
            def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
                return CertificateOptions(verify=False)

        return Insecure()
    return BrowserLikePolicyForHTTPS()


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    """One warm run against a running mirror; the exit status."""
    args = _arguments(sys.argv[1:] if argv is None else argv)
    try:
        policy = _policy(args)
    except (OSError, ValueError) as e:
        print(f"mirrord.warm: cannot use --ca {args.ca}: {e}", file=sys.stderr)
        return 2
    from twisted.internet import reactor
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    agent = Agent(reactor, contextFactory=policy, pool=pool, connectTimeout=args.timeout)
    terminal = Terminal(out)
    puller = Puller(
        agent,
        reactor,
        args.mirror,
        concurrency=args.concurrency,
        timeout=args.timeout,
        idle=args.timeout,
        verify=True,
        progress=terminal.progress,
    )
    status: list[int] = []

    async def run() -> None:
        failed = 0
        for image in args.images:
            try:
                result: Pulled | Failure = await puller.pull(image)
            except Exception:
                result = Failure()
                failed += 1
            terminal.done(image, result)
        await pool.closeCachedConnections()
        status.append(1 if failed else 0)

    def finish(result: object) -> None:
        if isinstance(result, Failure):
            out.write(f"mirrord.warm: {reason(result)}\n")
            status.append(1)
        reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(run()).addBoth(finish))
    reactor.run()
    return status[0] if status else 1


if __name__ == "__main__":
    sys.exit(main())
