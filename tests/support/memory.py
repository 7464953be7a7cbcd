"""A whole mirror in memory: the real resource tree and upstream chain,
with fake upstreams behind ``RequestTraversalAgent`` and a ``task.Clock``
driving every timeout."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import treq
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from mirrord.config import Access, CacheConfig, Config, MetricsAccess, Registry, Timeouts
from mirrord.daemon.tap import wire
from mirrord.front.login import Runner, run_inline
from mirrord.front.usage import CertificateNote
from mirrord.store.worker import Hasher, InlineHasher
from tests.support import images
from tests.support.fakehub import ByHost, Cdn, HubState, hub_resource

MIRROR = "https://mirror.test"
# Tags revalidated on every pull unless a test says otherwise (tag_ttl).
DEFAULT_CACHE = CacheConfig(tag_ttl=0)


@dataclass
class Reply:
    code: int
    headers: Any
    body: bytes
    length: Any  # Twisted's client moves Content-Length here

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode())
        return values[-1].decode() if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class MemoryMirror:
    """The mirror for ``Docker Hub`` served by fake hubs at ``hub.test`` and
    ``second.test`` (an anonymous one, as mirror.gcr.io would be)."""

    def __init__(
        self,
        test: SynchronousTestCase,
        tmp: Path,
        upstreams: tuple[str, ...] = ("http://hub.test",),
        timeouts: Timeouts | None = None,
        max_redirects: int = 5,
        quota_reserve: int = 5,
        cache: CacheConfig | None = DEFAULT_CACHE,
        registries: dict[str, Registry] | None = None,
        access: Access | None = None,
        metrics: MetricsAccess | None = None,
        hashers: Callable[[str], Hasher] = InlineHasher,
        login_checks: Runner = run_inline,
    ) -> None:
        self.test = test
        timeouts = timeouts or Timeouts()
        self.clock = Clock()
        self.hub = HubState(cdn_base="http://cdn.test", users={"alice": "secret"})
        self.second = HubState(cdn_base="http://cdn2.test", auth=False)
        self.alpine = images.single_arch(tmp / "alpine")
        self.private = images.single_arch(tmp / "private")
        for state in (self.hub, self.second):
            state.add("library/alpine", self.alpine)
        self.hub.add("alice/private", self.private)
        self.hub.private.add("alice/private")
        self.hosts = ByHost(
            {
                b"hub.test": hub_resource(self.hub),
                b"cdn.test": Cdn(self.hub),
                b"second.test": hub_resource(self.second),
                b"cdn2.test": Cdn(self.second),
            }
        )
        self.upstream = RequestTraversalAgent(self.hosts)
        config = Config(
            state_dir=str(tmp),
            max_redirects=max_redirects,
            quota_reserve=quota_reserve,
            timeouts=timeouts,
            cache=cache or CacheConfig(enabled=False),
            access=access or Access(),
            metrics=metrics or MetricsAccess(),
            registries={
                "docker.io": Registry("docker.io", upstreams, "library"),
                **(registries or {}),
            },
        )
        note = CertificateNote("/x.crt", False, "")
        self.config = config
        self.wiring = wire(config, self.upstream, self.clock, note, hashers, login_checks)
        self.store = self.wiring.store
        self.metrics = self.wiring.metrics
        # Traffic history, sampled each minute of the test clock.
        self.history = self.wiring.history
        self.history.startService()
        self.client = StubTreq(self.wiring.site.resource)
        # Serve with the daemon's own site (its request class, channel and
        # timeouts on the test clock), not treq's plain one.
        self.client._agent._serverFactory = self.wiring.site

    def add_host(self, host: bytes, resource: Resource) -> None:
        self.hosts.hosts[host] = resource

    def settle(self) -> None:
        for _ in range(20):
            self.upstream.flush()
            self.client.flush()

    def request(
        self, method: str, path: str, headers: dict[str, Any] | None = None, **kwargs: Any
    ) -> Reply:
        d = self.client.request(method, MIRROR + path, headers=headers, **kwargs)
        self.settle()
        response = self.test.successResultOf(d)
        body = treq.content(response)
        self.settle()
        return Reply(
            response.code, response.headers, self.test.successResultOf(body), response.length
        )

    def get(self, path: str, headers: dict[str, Any] | None = None, **kwargs: Any) -> Reply:
        return self.request("GET", path, headers, **kwargs)

    def token(self, scope: str, auth: tuple[str, str] | None = None) -> str:
        reply = self.get(f"/token?service=fakehub&scope={scope}", auth=auth)
        self.test.assertEqual(reply.code, 200, reply.body)
        return reply.json()["token"]

    def pull_headers(self, name: str, auth: tuple[str, str] | None = None) -> dict[str, str]:
        """Do what a client does: probe, take the challenge's token, return its headers."""
        self.get("/v2/")
        token = self.token(f"repository:{name}:pull", auth)
        return {"Authorization": f"Bearer {token}"}
