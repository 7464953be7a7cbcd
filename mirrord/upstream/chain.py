"""Talking to upstreams: one request, its redirects, and failing over along
an ordered chain when an upstream is rate-limited, down or unreachable.

Redirects are followed here for every request (Docker Hub's CDN, ghcr.io's
blob storage, registry.k8s.io's regional backends), never by the client,
and credentials never leave the upstream's origin. A 429 marks the upstream
as limited until its ``Retry-After`` passes, so later requests go straight
to the next one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin, urlsplit

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from mirrord.config import Timeouts
from mirrord.registry import errors
from mirrord.registry.headers import without_credentials
from mirrord.upstream.bodies import (
    BodyTimeout,
    BodyTooLarge,
    BytesProducer,
    discard_body,
    read_small_body,
)
from mirrord.upstream.identity import (
    MIRROR_IDENTITY,
    Account,
    MirrorIdentity,
    bearer_challenge,
    is_mirror,
)

log = Logger()

REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
FAILOVER_CODES = frozenset({429, 502, 503, 504})
# The longest an upstream rests after a 429, whatever its Retry-After says.
MAX_REST = 3600.0


class UpstreamTimeout(Exception):
    """An upstream did not answer within the response timeout."""


class TooManyRedirects(Exception):
    """A redirect chain was longer than the configured limit."""


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return (parts.scheme, (parts.hostname or "").lower(), parts.port or default)


def remaining_quota(headers: Headers) -> int | None:
    """Pulls left, from ``ratelimit-remaining: 85;w=21600`` (either spelling)."""
    for name in (b"ratelimit-remaining", b"x-ratelimit-remaining"):
        values = headers.getRawHeaders(name)
        if values:
            number = values[-1].split(b";", 1)[0].strip()
            return int(number) if number.isdigit() else None
    return None


def retry_after_seconds(headers: Headers, now: float) -> float | None:
    """``Retry-After`` as seconds from ``now``: either a number or an HTTP
    date, capped at ``MAX_REST`` (an upstream saying "come back next year"
    must not take itself out of the chain until a restart)."""
    value = headers.getRawHeaders(b"retry-after", [None])[-1]
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return min(float(text), MAX_REST)
    try:
        return min(max(0.0, parsedate_to_datetime(text).timestamp() - now), MAX_REST)
    except (TypeError, ValueError, OverflowError):
        return None


def _cancelled(error: Exception) -> bool:
    """Cancellation surfaces from Agent in its own types; our own response
    timeout was already turned into ``UpstreamTimeout``."""
    if isinstance(error, ConnectingCancelledError):
        return True
    reasons = getattr(error, "reasons", None)
    return bool(reasons) and any(r.check(CancelledError) for r in reasons)


@dataclass
class Answer:
    """An upstream's answer: a live response whose body is still to be read,
    or (for a failed attempt kept for the client) the small body already read."""

    response: IResponse
    url: str
    upstream: str
    redirects: int = 0
    fell_back: bool = False
    body: bytes | None = None
    # Whom the upstream counted the request against: the mirror's account
    # or "anonymous" for requests made as the mirror, "" for a client's own.
    identity: str = ""

    @property
    def code(self) -> int:
        return self.response.code

    @property
    def headers(self) -> Headers:
        return self.response.headers


@dataclass
class RedirectFollower:
    """Makes one request with an ``IAgent`` and follows its redirects."""

    agent: IAgent
    clock: IReactorTime
    response_timeout: float
    max_redirects: int
    body_idle: float = Timeouts.body_idle

    async def fetch(
        self,
        method: bytes,
        url: str,
        headers: Headers,
        trusted_origin: str,
        body: bytes | None = None,
    ) -> tuple[IResponse, str, int]:
        """The final response, its URL and how many redirects led there.

        ``headers`` carry credentials only while the URL stays on
        ``trusted_origin``'s origin.
        """
        safe_headers = without_credentials(headers)
        trusted = origin(trusted_origin)
        for hop in range(self.max_redirects + 1):
            sent = headers if origin(url) == trusted else safe_headers
            response = await self._request(method, url, sent, body)
            location = response.headers.getRawHeaders(b"location", [None])[-1]
            if response.code not in REDIRECT_CODES or location is None:
                return response, url, hop
            discard_body(response, self.clock, self.body_idle)
            target = urljoin(url, location.decode("latin-1"))
            if urlsplit(target).scheme not in ("http", "https"):
                raise errors.bad_gateway(f"upstream redirected to a non-HTTP URL: {target}")
            if response.code == 303 and method != b"HEAD":
                method, body = b"GET", None
            log.debug(
                "{code} redirect {url} -> {target}", code=response.code, url=url, target=target
            )
            url = target
        raise TooManyRedirects(f"more than {self.max_redirects} redirects from {url}")

    def _request(
        self, method: bytes, url: str, headers: Headers, body: bytes | None
    ) -> Deferred[IResponse]:
        producer = None if body is None else BytesProducer(body)
        d = self.agent.request(method, url.encode("ascii"), headers.copy(), producer)
        timed_out = []

        def expire() -> None:
            timed_out.append(True)
            d.cancel()

        timer = self.clock.callLater(self.response_timeout, expire)

        def done(result: object) -> object:
            if timer.active():
                timer.cancel()
            if timed_out:
                raise UpstreamTimeout(f"no response from {url} within {self.response_timeout:g}s")
            return result

        return d.addBoth(done)


@dataclass
class Upstream:
    """One upstream in a chain and whether it is resting after a 429."""

    url: str
    limited_until: float = 0.0
    # Pulls left in the upstream's window, by the identity they count
    # against ("anonymous" or the account), as its last answer said.
    quota: dict[str, int] = field(default_factory=dict)

    def limited(self, now: float) -> bool:
        return now < self.limited_until


@dataclass
class UpstreamChain:
    """An ordered list of upstreams tried in turn for each request."""

    urls: Sequence[str]
    follower: RedirectFollower
    rate_limit_seconds: float
    wall_clock: IReactorTime
    on_rate_limited: Callable[[str], None] = lambda upstream: None
    # Every answer an upstream gives (metrics: quota headers, fallbacks).
    on_answer: Callable[[Answer], None] = lambda answer: None
    # The mirror's own account with the first upstream, if any.
    account: Account | None = None
    # Pulls left at which the mirror's manifest GETs go to the next upstream
    # before the upstream answers 429 (HEADs, free, still go first).
    quota_reserve: int = 0
    upstreams: list[Upstream] = field(init=False)
    identity: MirrorIdentity = field(init=False)

    def __post_init__(self) -> None:
        self.upstreams = [Upstream(url) for url in self.urls]
        self.identity = MirrorIdentity(self.follower, self.wall_clock)
        self.identity.set_primary(self.urls[0] if self.urls else "", self.account)

    def set_urls(self, urls: Sequence[str], account: Account | None = None) -> None:
        """A new chain (on reload); upstreams kept keep their rest."""
        known = {u.url: u for u in self.upstreams}
        self.urls = tuple(urls)
        self.upstreams = [known.get(url) or Upstream(url) for url in urls]
        self.account = account
        self.identity.set_primary(self.urls[0] if self.urls else "", account)

    async def request(self, method: bytes, path: str, headers: Headers) -> Answer:
        """The first good answer along the chain, or the last failed one."""
        now = self.wall_clock.seconds()
        candidates = [u for u in self.upstreams if not u.limited(now)]
        if not candidates:
            soonest = min(u.limited_until for u in self.upstreams)
            raise errors.rate_limited(max(1, round(soonest - now)))
        if method == b"GET" and "/manifests/" in path and is_mirror(headers):
            # Spend the pull quota of an upstream near its reserve last.
            candidates.sort(key=lambda u: self._at_reserve(u))
        last: Answer | None = None
        failure: errors.RegistryError | None = None
        for index, upstream in enumerate(candidates):
            fell_back = upstream is not self.upstreams[0]
            try:
                response, url, hops = await self._fetch(upstream, method, path, headers)
            except CancelledError:
                raise
            except errors.RegistryError as e:
                failure = e
                continue
            except (UpstreamTimeout, ConnectTimeout) as e:
                failure = errors.gateway_timeout(f"upstream {upstream.url}: {e}")
                log.warn("upstream {upstream} timed out: {error}", upstream=upstream.url, error=e)
                continue
            except TooManyRedirects as e:
                failure = errors.bad_gateway(str(e))
                continue
            except Exception as e:
                if _cancelled(e):
                    # The client went away: stop here, do not try the next one.
                    raise CancelledError() from e
                failure = errors.bad_gateway(f"upstream {upstream.url} unreachable")
                log.warn("upstream {upstream} failed: {error!r}", upstream=upstream.url, error=e)
                continue
            identity = self.identity.tokens(upstream.url).identity if is_mirror(headers) else ""
            answer = Answer(response, url, upstream.url, hops, fell_back, identity=identity)
            if identity:
                self._note_quota(upstream, identity, response.headers)
            self.on_answer(answer)
            if response.code not in FAILOVER_CODES:
                return answer
            if response.code == 429:
                self.on_rate_limited(upstream.url)
                self._rest(upstream, response.headers)
            log.info(
                "upstream {upstream} answered {code}; {next}",
                upstream=upstream.url,
                code=response.code,
                next="trying the next" if index + 1 < len(candidates) else "no more upstreams",
            )
            try:
                answer.body = await read_small_body(
                    response, self.follower.clock, self.follower.body_idle
                )
            except (BodyTooLarge, BodyTimeout):
                answer.body = errors.error_body("UNAVAILABLE", f"upstream answered {response.code}")
            except CancelledError:
                raise
            except Exception:
                answer.body = b""
            last = answer
        if last is not None:
            return last
        assert failure is not None
        raise failure

    def _at_reserve(self, upstream: Upstream) -> bool:
        identity = self.identity.tokens(upstream.url).identity
        left = upstream.quota.get(identity)
        return left is not None and left <= self.quota_reserve

    def _note_quota(self, upstream: Upstream, identity: str, headers: Headers) -> None:
        left = remaining_quota(headers)
        if left is not None:
            upstream.quota[identity] = left

    async def _fetch(
        self, upstream: Upstream, method: bytes, path: str, headers: Headers
    ) -> tuple[IResponse, str, int]:
        """One upstream's answer; as the mirror, with the mirror's token for
        it, fetched (once more after a refusal) when the upstream asks."""
        tokens = self.identity.tokens(upstream.url)
        if not is_mirror(headers):
            found = await self.follower.fetch(method, upstream.url + path, headers, upstream.url)
            if found[0].code == 401 and tokens.challenge is None:
                # Learn where this upstream's tokens come from, for the
                # mirror's own requests: they need not be refused first.
                challenge = bearer_challenge(found[0].headers)
                if challenge is not None:
                    tokens.learn(challenge)
            return found
        sent = headers.copy()
        sent.removeHeader(MIRROR_IDENTITY)
        token = tokens.cached(path)
        if token is None and tokens.challenge is not None:
            token = await tokens.fetch(path)
        for attempt in range(2):
            if token:
                sent.setRawHeaders(b"authorization", [f"Bearer {token}".encode()])
            response, url, hops = await self.follower.fetch(
                method, upstream.url + path, sent, upstream.url
            )
            challenge = bearer_challenge(response.headers) if response.code == 401 else None
            if challenge is None or attempt == 1:
                return response, url, hops
            tokens.refused(challenge, path)
            discard_body(response, self.follower.clock, self.follower.body_idle)
            token = await tokens.fetch(path)
        raise AssertionError("unreachable")

    def _rest(self, upstream: Upstream, headers: Headers) -> None:
        now = self.wall_clock.seconds()
        seconds = retry_after_seconds(headers, now)
        upstream.limited_until = now + (seconds if seconds is not None else self.rate_limit_seconds)
        log.warn(
            "upstream {upstream} is rate-limited for {seconds:.0f}s",
            upstream=upstream.url,
            seconds=upstream.limited_until - now,
        )
