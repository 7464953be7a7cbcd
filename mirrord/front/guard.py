"""Not an open relay: who may use the mirror, and how much at once.

Checked for every request before it reaches the resource tree (``/healthz``
excepted): the client's address (taken from ``X-Forwarded-For`` only when
the peer is a trusted proxy) against the allow-list, its ``User-Agent``
against the block patterns, and its connections and requests in flight
against the per-address limits. A refusal is a registry JSON error: 403
``DENIED``, or 429 ``TOOMANYREQUESTS`` with ``Retry-After``; other clients'
requests are never touched.

Then, on ``/v2/`` and ``/token``, the mirror login. A password check runs
in a thread, so a request whose credentials are not remembered waits for it
in ``_AwaitLogin`` and goes on down the tree once they are right. An
address with too many failed logins is refused (429), even with the right
password, until its window has passed: otherwise guessing would only cost
the guesser some retries.

The per-address counts are the host's, not a process's: with worker
processes they live in the workers' shared table (``clienttable``), so a
client cannot multiply its limits by the number of workers.
"""

from __future__ import annotations

import base64
import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.server import NOT_DONE_YET, Request

from mirrord.config import Access
from mirrord.expiring import Expiring
from mirrord.front.clienttable import CHECKING, CONNECTIONS, REQUESTS, ClientTable, SharedCounter
from mirrord.front.login import LoginBusy, MirrorLogin
from mirrord.registry import errors
from mirrord.registry.respond import client_address, peer_address, write_error
from mirrord.tokens import MirrorTokens

log = Logger()

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(values: tuple[str, ...]) -> list[Network]:
    return [ipaddress.ip_network(v, strict=False) for v in values]


def _in(address: str, networks: list[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


BASIC_CHALLENGE = (b"WWW-Authenticate", b'Basic realm="mirrord"')
# Remembered addresses with failed logins; past this the oldest are dropped.
MAX_FAILED_ADDRESSES = 10_000


def _failure_key(address: str) -> str:
    """Failures count per IPv4 address, and per /64 for IPv6: one host
    usually has a whole /64 to pick its addresses from."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass
class _Failures:
    count: int
    until: float  # when the address's record is forgotten


class FailedLogins:
    """Failed logins per client address over a window of ``window`` seconds
    from the first; at ``limit`` the address is refused for ``window``
    seconds from its last failure. The map is bounded (``Expiring``).

    Credentials still being checked count as failures to come: a guesser
    gets ``limit`` guesses per window however many it sends at once, while
    requests bringing credentials already being checked wait for that check.
    """

    def __init__(
        self,
        limit: int,
        window: float,
        now: Callable[[], float],
        max_addresses: int = MAX_FAILED_ADDRESSES,
    ) -> None:
        self.limit = limit
        self.window = window
        self._now = now
        self._failures: Expiring[str, _Failures] = Expiring(now, max_addresses)
        # Requests waiting for a check, per address and credentials: as many
        # entries at most as requests in flight.
        self._checking: dict[str, Counter[bytes]] = {}

    def failed(self, address: str) -> None:
        if not self.limit:
            return
        self._add_failure(_failure_key(address))

    def _add_failure(self, key: str) -> None:
        now = self._now()
        record = self._failures.get(key) or _Failures(0, now + self.window)
        record.count += 1
        if record.count >= self.limit:
            record.until = now + self.window
        self._failures.put(key, record, record.until - now)

    def _record(self, key: str) -> tuple[int, float]:
        """The failures counted for ``key`` and when its record ends."""
        record = self._failures.get(key)
        return (record.count, record.until) if record is not None else (0, 0.0)

    def _checks(self, key: str) -> int:
        """How many distinct credentials from ``key`` are being checked."""
        return len(self._checking.get(key, {}))

    def refused_for(self, address: str, credentials: bytes = b"") -> int | None:
        """Seconds until the address may try ``credentials``, or None if it may now."""
        if not self.limit:
            return None
        key = _failure_key(address)
        failures, until = self._record(key)
        if failures >= self.limit:
            return max(1, math.ceil(until - self._now()))
        checking = self._checking.get(key, {})
        if credentials not in checking and failures + self._checks(key) >= self.limit:
            return 1  # the checks under way decide; they take well under a second
        return None

    def checking(self, address: str, credentials: bytes) -> None:
        if not self.limit:
            return
        key = _failure_key(address)
        checking = self._checking.setdefault(key, Counter())
        if not checking[credentials]:
            self._check_started(key)
        checking[credentials] += 1

    def checked(self, address: str, credentials: bytes) -> None:
        key = _failure_key(address)
        checking = self._checking.get(key)
        if checking is None:
            return
        checking[credentials] -= 1
        if checking[credentials] <= 0:
            del checking[credentials]
            self._check_ended(key)
        if not checking:
            del self._checking[key]

    def _check_started(self, key: str) -> None:
        pass

    def _check_ended(self, key: str) -> None:
        pass

    def __len__(self) -> int:
        return len(self._failures)


class SharedFailedLogins(FailedLogins):
    """``FailedLogins`` over all the workers of the host: the failures and
    the number of credentials being checked per address are in the shared
    ``ClientTable``. Which credentials this worker is checking stays in its
    memory, so a request bringing credentials under check in another
    worker counts as one more guess: near the limit it is told to retry in
    a second. An address the table has no room for is counted in this
    worker's memory, as ``FailedLogins`` does."""

    def __init__(
        self, limit: int, window: float, now: Callable[[], float], table: ClientTable
    ) -> None:
        super().__init__(limit, window, now)
        self._table = table
        self._checks_shared = SharedCounter(table, CHECKING)

    def _add_failure(self, key: str) -> None:
        if not self._table.failed(key, self.limit, self.window):
            super()._add_failure(key)

    def _record(self, key: str) -> tuple[int, float]:
        count, until = self._table.failures(key)
        mine, my_until = super()._record(key)
        return count + mine, max(until, my_until)

    def _checks(self, key: str) -> int:
        return self._checks_shared[key]

    def _check_started(self, key: str) -> None:
        self._checks_shared.add(key)

    def _check_ended(self, key: str) -> None:
        self._checks_shared.remove(key)

    def __len__(self) -> int:
        return self._table.failing() + super().__len__()


class _LocalCounter:
    """A per-client count in this process's memory (the one process)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def add(self, key: str) -> None:
        self._counts[key] += 1

    def remove(self, key: str) -> None:
        self._counts[key] -= 1
        if self._counts[key] <= 0:
            del self._counts[key]

    def __getitem__(self, key: str) -> int:
        return self._counts[key]


Decision = errors.RegistryError | None


class Guard:
    """The access policy and the per-address counters it keeps."""

    def __init__(
        self,
        access: Access,
        login: MirrorLogin | None = None,
        *,
        now: Callable[[], float],
        tokens: MirrorTokens | None = None,
        table: ClientTable | None = None,
    ) -> None:
        """``table``: the workers' shared counts; None in the one process."""
        self.access = access
        self.login = login
        # Tokens /token signed for logged-in clients are accepted on /v2/.
        self.tokens = tokens
        limit, window = access.max_failed_logins, access.failed_login_window
        self.failed_logins = (
            FailedLogins(limit, window, now)
            if table is None
            else SharedFailedLogins(limit, window, now, table)
        )
        self._allowed = _networks(access.allow_clients)
        self._trusted = _networks(access.trusted_proxies)
        self._blocked = [re.compile(p) for p in access.block_user_agents]
        self.connections: _LocalCounter | SharedCounter
        self.requests: _LocalCounter | SharedCounter
        if table is None:
            self.connections, self.requests = _LocalCounter(), _LocalCounter()
        else:
            self.connections = SharedCounter(table, CONNECTIONS)
            self.requests = SharedCounter(table, REQUESTS)

    def client_address(self, peer: str, forwarded: list[bytes]) -> str:
        """The real client: walk X-Forwarded-For from the right while the hop
        is a trusted proxy."""
        address = peer
        hops = [h.strip() for v in forwarded for h in v.decode("latin-1").split(",")]
        while hops and _in(address, self._trusted):
            address = hops.pop()
        return address

    def connection_made(self, peer: str) -> None:
        self.connections.add(peer)

    def connection_lost(self, peer: str) -> None:
        self.connections.remove(peer)

    def check(self, request: Request, client: str, peer: str) -> errors.RegistryError | None:
        access = self.access
        if self._allowed and not _in(client, self._allowed):
            return errors.denied(f"client {client} is not allowed to use this mirror")
        agent = (request.getHeader(b"user-agent") or b"").decode("latin-1")
        if any(pattern.search(agent) for pattern in self._blocked):
            return errors.denied("this client software is not allowed to use this mirror")
        limit = access.max_connections_per_client
        if limit and self.connections[peer] > limit:
            request.setHeader(b"Connection", b"close")
            return _busy(access)
        limit = access.max_requests_per_client
        if limit and self.requests[client] >= limit:
            return _busy(access)
        return None

    def authenticate(self, request: Request, path: bytes) -> Decision | Deferred[Decision]:
        """Mirror login on /v2/ and /token; see ``mirrord.front.login``. A Deferred
        when the credentials must be checked (in the login worker)."""
        login = self.login
        if login is None or not login.enabled or path not in (b"v2", b"token"):
            return None
        header = request.getHeader(b"authorization") or b""
        scheme = header[:7].lower()
        if scheme.startswith(b"basic "):
            client = client_address(request)
            failed_logins = self.failed_logins
            wait = failed_logins.refused_for(client, header)
            if wait is not None:
                return errors.RegistryError(
                    429,
                    "TOOMANYREQUESTS",
                    "too many failed logins from your address; retry later",
                    retry_after=wait,
                )
            known = login.known(header)
            if known is not None:
                return self._logged_in(known, request, client)
            failed_logins.checking(client, header)
            checked = login.check(header)

            def done(result: object) -> object:
                failed_logins.checked(client, header)
                return result

            checked.addBoth(done)
            checked.addCallback(self._logged_in, request, client)
            checked.addErrback(self._check_refused)
            return checked
        if path == b"v2" and scheme == b"bearer " and self._token_ok(header[7:].strip()):
            return None
        return errors.RegistryError(401, "UNAUTHORIZED", "log in to this mirror first")

    def _logged_in(self, ok: bool, request: Request, client: str) -> Decision:
        if not ok:
            self.failed_logins.failed(client)
            return errors.RegistryError(401, "UNAUTHORIZED", "wrong mirror credentials")
        # The mirror's credentials are never sent upstream.
        header = request.getHeader(b"authorization") or b""
        request.requestHeaders.removeHeader(b"authorization")
        request.mirror_login = _user_of(header)  # type: ignore[attr-defined]
        return None

    def _token_ok(self, token: bytes) -> bool:
        """A token the mirror signed for a logged-in client (on /token)."""
        if self.tokens is None:
            return False
        grant = self.tokens.check(token.decode("latin-1"))
        return grant is not None and bool(grant.login)

    def _check_refused(self, failure: Failure) -> Decision:
        failure.trap(LoginBusy)
        return errors.RegistryError(
            503, "UNAVAILABLE", "too many logins being checked; retry shortly", retry_after=1
        )


class _Refusal(Resource):
    isLeaf = True

    def __init__(self, error: errors.RegistryError) -> None:
        super().__init__()
        self._error = error

    def render(self, request: Request) -> int:
        if self._error.status == 401:
            request.setHeader(*BASIC_CHALLENGE)
        write_error(request, self._error)
        return NOT_DONE_YET


class _AwaitLogin(Resource):
    """Holds a request while its credentials are checked, then hands it on
    down the tree (or refuses it). A client that leaves cancels the check;
    nothing is written after it left."""

    isLeaf = True

    def __init__(self, decision: Deferred[Decision], proceed: Callable[[], Resource]) -> None:
        super().__init__()
        self._decision = decision
        self._proceed = proceed

    def render(self, request: Request) -> int:
        decision = self._decision
        request.notifyFinish().addErrback(lambda _: decision.cancel())
        decision.addCallback(self._decided, request)
        decision.addErrback(self._failed, request)
        return NOT_DONE_YET

    def _decided(self, refusal: Decision, request: Request) -> None:
        if refusal is not None:
            _Refusal(refusal).render(request)
            return
        # The rest of the path, as Site.getResourceFor would have walked it.
        request.render(getChildForRequest(self._proceed(), request))

    def _failed(self, failure: Failure, request: Request) -> None:
        if failure.check(CancelledError):
            return
        if request.startedWriting:
            # The resource below failed mid-answer: as Twisted's own
            # Request.process would handle it.
            request.processingFailed(failure)
            return
        log.failure("checking mirror credentials failed", failure)
        write_error(
            request, errors.RegistryError(500, "UNKNOWN", "could not check the mirror credentials")
        )


class GuardedRoot(Resource):
    """Wraps the root resource: every request passes the guard first."""

    def __init__(self, root: Resource, guard: Guard, exempt: tuple[bytes, ...] = (b"healthz",)):
        super().__init__()
        self._root = root
        self._guard = guard
        self._exempt = exempt

    def exempt(self, path: bytes) -> None:
        """Let requests under ``/<path>`` by the guard (they check themselves)."""
        self._exempt = (*self._exempt, path)

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        if path in self._exempt:
            return self._root.getChildWithDefault(path, request)
        refusal = self._admit(request) or self._guard.authenticate(request, path)
        if isinstance(refusal, Deferred):
            return _AwaitLogin(refusal, lambda: self._root.getChildWithDefault(path, request))
        if refusal is not None:
            return _Refusal(refusal)
        return self._root.getChildWithDefault(path, request)

    def render(self, request: Request) -> bytes | int:
        refusal = self._admit(request)
        if refusal is not None:
            return _Refusal(refusal).render(request)
        return self._root.render(request)

    def _admit(self, request: Request) -> errors.RegistryError | None:
        peer = peer_address(request)
        client = self._guard.client_address(
            peer, request.requestHeaders.getRawHeaders(b"x-forwarded-for", [])
        )
        request.client_ip = client  # type: ignore[attr-defined]
        refusal = self._guard.check(request, client, peer)
        # Requests in flight are counted only while a limit needs them: the
        # count costs a Deferred per request (and a locked table with workers).
        if refusal is None and self._guard.access.max_requests_per_client:
            requests = self._guard.requests
            requests.add(client)
            request.notifyFinish().addBoth(lambda _: requests.remove(client))
        return refusal


def _busy(access: Access) -> errors.RegistryError:
    return errors.RegistryError(
        429,
        "TOOMANYREQUESTS",
        "too many at once from your address; retry later",
        retry_after=access.retry_after,
    )


def _user_of(header: bytes) -> str:
    """The user name of a Basic header already checked (never empty)."""
    try:
        return base64.b64decode(header[6:]).decode().partition(":")[0] or "-"
    except (ValueError, UnicodeDecodeError):
        return "-"
