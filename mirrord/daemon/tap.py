"""``twistd mirrord``: the command line, and the one place where the parts
are wired together into a running service."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorTime, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent
from twisted.web.server import Request

from mirrord import config as configuration
from mirrord.config import Config, ConfigError, Registry
from mirrord.daemon import check
from mirrord.daemon.acme import AcmeService, Issuer, held_certificate
from mirrord.daemon.admin import admin_service
from mirrord.daemon.alpn import ALPNResponder
from mirrord.daemon.fleetwiring import FleetParts, build_fleet
from mirrord.daemon.http01 import HTTP01Responder, challenge_site
from mirrord.daemon.inherited import AdoptedEndpoint, Inherited, ParentChannel, die_with_parent
from mirrord.daemon.role import Role
from mirrord.daemon.service import MirrordService
from mirrord.daemon.supervisor import Bound, Launcher, Supervisor
from mirrord.daemon.systemd import notify
from mirrord.daemon.tls import (
    CertificateError,
    ServerTLS,
    ensure_self_signed,
    fingerprint,
    make_context,
    upstream_policy,
)
from mirrord.daemon.warm import RecordingEndpoint, build_warm_service
from mirrord.front.accesslog import CombinedLog
from mirrord.front.guard import Guard
from mirrord.front.history import History
from mirrord.front.login import LoginWorker, MirrorLogin, Runner, run_inline
from mirrord.front.site import MirrordSite, build_site, mount_internal
from mirrord.front.status import FiguresAccess, StatusSource, totals
from mirrord.front.usage import CertificateNote, render_usage
from mirrord.front.workershare import WorkerShare
from mirrord.metrics import Metrics, MetricsResource
from mirrord.registry.challenges import KNOWN_REALMS, RealmBook
from mirrord.registry.imageref import parse_image
from mirrord.registry.routing import Router
from mirrord.serve.clients import ClientAuth
from mirrord.serve.privacy import AccessChecks
from mirrord.serve.pullthrough import PullThrough
from mirrord.serve.token import TokenProxy, TokenTarget
from mirrord.serve.v2 import Backend, PassThrough, RegistryProxy
from mirrord.store.disk import BlobStore
from mirrord.store.inflight import InFlight
from mirrord.store.inventory import read_pins
from mirrord.store.worker import Hasher, HashWorker, InlineHasher
from mirrord.tokens import MirrorTokens
from mirrord.tuning import LargeWriteTLSFactory, UpstreamEndpoints, raise_mmap_threshold
from mirrord.upstream.chain import RedirectFollower, UpstreamChain
from mirrord.upstream.identity import Account

log = Logger()


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a TLS pull-through mirror of Docker Hub (or the registry given by "
        "--upstream). Settings come from the TOML file given by --config, or "
        f"{configuration.DEFAULT_CONFIG_PATH} when it exists; the options below "
        "override it. With no certificate configured, a self-signed one is made "
        "in the state directory."
    )
    optFlags = [
        [
            "check-config",
            None,
            "Check the configuration as a start would (files, certificate, listen "
            "entries; no port is bound), print the effective settings and exit 0, "
            "or print the one-line error and exit 1.",
        ],
    ]
    optParameters = [
        ["config", "c", None, "TOML configuration file.", Path],
        ["cert", None, None, "PEM certificate chain (e.g. certbot's fullchain.pem)."],
        ["key", None, None, "PEM private key (e.g. certbot's privkey.pem)."],
        ["state-dir", None, None, "Directory for state (default /var/lib/mirrord)."],
        [
            "workers",
            None,
            None,
            "Worker processes serving the listeners (default: the file's 'workers', "
            "or one per usable core); 1 runs one process.",
            int,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["upstream"] = []

    def opt_listen(self, value: str) -> None:
        """Port or Twisted endpoint string to serve TLS on (repeatable; default 443)."""
        self["listen"].append(value)

    opt_l = opt_listen

    def opt_upstream(self, value: str) -> None:
        """Upstream URL of the default registry (repeatable: the ordered fallback chain)."""
        self["upstream"].append(value)

    opt_u = opt_upstream

    def load(self) -> Config:
        """The configuration file with this command line's overrides on top."""
        return self.overrides(configuration.load(self["config"]))

    def overrides(self, config: Config) -> Config:
        """This command line's options on top of ``config``."""
        return configuration.with_overrides(
            config,
            listen=self["listen"],
            cert=self["cert"],
            key=self["key"],
            state_dir=self["state-dir"],
            upstreams=self["upstream"],
            workers=self["workers"],
        )

    def source(self) -> Path | None:
        """The configuration file read, if any."""
        if self["config"] is not None:
            return Path(self["config"])
        if configuration.DEFAULT_CONFIG_PATH.exists():
            return configuration.DEFAULT_CONFIG_PATH
        return None

    def worker_argv(self, config: Path) -> list[str]:
        """``twistd mirrord`` for a worker: reading ``config`` (the copy the
        supervisor checked) with this command line's overrides, logging
        with mirrord's observer to the inherited stdout, no pid file."""
        args = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
            "--logger=mirrord.daemon.logs.observer",
            "mirrord",
            "--config",
            str(config),
        ]
        for name in ("cert", "key", "state-dir"):
            if self[name] is not None:
                args += [f"--{name}", self[name]]
        args += [arg for entry in self["listen"] for arg in ("--listen", entry)]
        args += [arg for url in self["upstream"] for arg in ("--upstream", url)]
        return args

    def postOptions(self) -> None:
        try:
            self["mirrord"] = self.load()
        except ConfigError as e:
            # A configuration problem is one line naming the key and file;
            # twistd's usage text (which UsageError prints) would bury it.
            raise SystemExit(f"mirrord: {e}") from None
        if self["check-config"]:
            self.check_config()

    def check_config(self) -> NoReturn:
        """``--check-config``: the settings on stdout and exit 0, or the
        one-line error on stderr and exit 1."""
        from twisted.internet import reactor

        source = self["config"] or (
            configuration.DEFAULT_CONFIG_PATH
            if configuration.DEFAULT_CONFIG_PATH.exists()
            else "the built-in defaults"
        )
        try:
            text = check.report(
                self["mirrord"],
                str(source),
                lambda entry: serverFromString(reactor, listen_description(entry)),
            )
        except (ConfigError, CertificateError, OSError) as e:
            raise SystemExit(f"mirrord: {e}") from None
        sys.stdout.write(text)
        sys.stdout.flush()
        raise SystemExit(0)


def listen_description(entry: str) -> str:
    """A bare port listens on every IPv4 and IPv6 address."""
    if entry.isdigit():
        return f"tcp6:{entry}:interface=\\:\\:"
    return entry


def certificate(config: Config) -> tuple[Path, Path, CertificateNote]:
    # An ACME certificate, once held, wins; until then ``cert`` (say, the
    # one certbot kept) or the self-signed one is served.
    held = held_certificate(config) if config.acme_domains else None
    if held is not None:
        # Key and chain in one file: make_context reads each part from it.
        return held, held, CertificateNote(str(held), False, "")
    if config.cert:
        cert, key = Path(config.cert), Path(config.key)
        return cert, key, CertificateNote(str(cert), False, "")
    cert, key, made = ensure_self_signed(Path(config.state_dir))
    note = CertificateNote(str(cert), True, fingerprint(cert))
    log.warn(
        "{why}: serving the self-signed certificate {path} "
        "({state}; SHA-256 {fingerprint}); clients must trust it",
        why="no ACME certificate yet" if config.acme_domains else "no certificate configured",
        path=str(cert),
        state="made now" if made else "made earlier",
        fingerprint=note.fingerprint,
    )
    return cert, key, note


def open_store(config: Config, clock: IReactorTime) -> BlobStore | None:
    """The cache shared by every registry (it is content-addressed)."""
    if not config.cache.enabled:
        return None
    root = Path(config.state_dir) / config.cache.path
    store = BlobStore(
        root,
        config.cache.max_size,
        config.cache.high_watermark,
        config.cache.low_watermark,
        config.cache.pinned + read_pins(root),
        now=clock.seconds,
        share=True,
    )
    entries, removed = store.rebuild()
    log.info(
        "cache {root}: {entries} blobs, {size} bytes; removed {removed} leftovers",
        root=str(root),
        entries=entries,
        size=store.size,
        removed=removed,
    )
    return store


def build_backend(
    config: Config,
    target: TokenTarget,
    store: BlobStore | None,
    follower: RedirectFollower,
    clock: IReactorTime,
    metrics: Metrics,
    hashers: Callable[[str], Hasher] = InlineHasher,
    in_flight: InFlight | None = None,
    access: AccessChecks | None = None,
    fleet: FleetParts | None = None,
) -> Backend:
    """The cache in front of a registry's chain, or the chain alone.
    ``in_flight`` is the store's table of fetches, shared by every registry;
    ``access`` the registry's privacy checks."""
    if store is None:
        return PassThrough(target.chain, target.realms, clock, config.timeouts)
    if access is None:
        access = access_checks(config, target, follower, clock)
    return PullThrough(
        target.registry,
        target.chain,
        store,
        store.tags,
        access,
        target.realms,
        clock,
        config.timeouts,
        config.cache,
        metrics,
        hashers,
        in_flight,
        shared=fleet.bucket if fleet else None,
        redirect=config.store.redirect,
        fleet=fleet.fleet if fleet else None,
    )


def access_checks(
    config: Config, target: TokenTarget, follower: RedirectFollower, clock: IReactorTime
) -> AccessChecks:
    """Who may read what of a registry: the cache's privacy rule, and what
    anonymous clients may read when the mirror has an account."""
    return AccessChecks(
        target.chain, follower, clock, config.cache.auth_ttl, registry=target.registry.name
    )


# What a reload applies; anything else that changed waits for a restart.
RELOADED = frozenset({"cert", "key", "tls_min_version", "tls_ciphers"})


def account_of(registry: Registry) -> Account | None:
    """The mirror's account with a registry (its password file read now)."""
    if not registry.username:
        return None
    return Account(registry.username, registry.account_password())


def needs_restart(old: Config, new: Config) -> list[str]:
    """The changed settings a reload cannot apply (upstream chains it can)."""
    changed = [
        f.name
        for f in dataclasses.fields(Config)
        if f.name not in RELOADED | {"registries"} and getattr(old, f.name) != getattr(new, f.name)
    ]

    def unreloadable(registry: Registry) -> Registry:
        return dataclasses.replace(
            registry, upstreams=(), username="", password="", password_file=""
        )

    chains_only = {name: unreloadable(r) for name, r in new.registries.items()} == {
        name: unreloadable(r) for name, r in old.registries.items()
    }
    return changed if chains_only else [*changed, "registries"]


def checked(config: Config) -> tuple[Path, Any]:
    """The certificate ``config`` serves and its TLS context: what a start
    or a reload needs to work. Raises what is wrong."""
    cert, key, _ = certificate(config)
    return cert, make_context(cert, key, config.tls_min_version, config.tls_ciphers)


def reloader(
    load: Callable[[], Config],
    running: Config,
    server_tls: ServerTLS,
    chains: Mapping[str, UpstreamChain],
) -> Callable[[], None]:
    """SIGHUP: re-read the configuration and the certificate files. New
    connections get the new certificate; transfers in progress are not
    touched. Anything broken keeps the running setup and says what."""
    current = [running]

    def reload() -> None:
        try:
            config = load()
            cert, context = checked(config)
        except (ConfigError, CertificateError, OSError, ValueError) as e:
            log.error("reload failed, still running the previous setup: {error}", error=str(e))
            return
        server_tls.context = context
        for name, chain in chains.items():
            if name in config.registries:
                registry = config.registries[name]
                chain.set_urls(registry.upstreams, account_of(registry))
        for key_name in needs_restart(current[0], config):
            log.warn("{key} changed: takes effect on restart", key=key_name)
        current[0] = config
        log.info(
            "reloaded: certificate {cert}, upstreams {upstreams}",
            cert=str(cert),
            upstreams="; ".join(
                f"{name}: {', '.join(r.upstreams)}" for name, r in config.registries.items()
            ),
        )

    return reload


@dataclass
class Wiring:
    """The request-handling parts, wired: what a test drives in memory and
    what the service puts behind its listeners."""

    site: MirrordSite
    targets: dict[str, TokenTarget]
    store: BlobStore | None
    metrics: Metrics
    # Per-minute traffic for the status page; a service the daemon starts.
    history: History
    # The fetches in flight, one per digest for the whole daemon.
    in_flight: InFlight
    # The shared store and the fleet, when configured.
    fleet: FleetParts | None = None


def wire(
    config: Config,
    agent: IAgent,
    reactor: Any,
    note: CertificateNote,
    hashers: Callable[[str], Hasher] = InlineHasher,
    login_checks: Runner = run_inline,
) -> Wiring:
    """Registries, their upstream chains and backends, the resource tree.
    ``hashers`` makes a fill's hasher: a ``HashWorker``'s in the daemon;
    ``login_checks`` runs password checks: a ``LoginWorker``'s there."""
    clock: IReactorTime = reactor
    role = Role.from_environ()
    share = None
    if role.is_worker and role.shared_dir is not None:
        share = WorkerShare.open(role.index, role.count, role.shared_dir, clock.seconds)
    metrics = Metrics(share.metrics_dir if share else None)
    login = MirrorLogin(config.access.users, clock.seconds, run=login_checks)
    follower = RedirectFollower(
        agent, clock, config.timeouts.response, config.max_redirects, config.timeouts.body_idle
    )
    store = open_store(config, clock)
    if store is not None:
        store.offload = hashers("sha256").run  # the shared index's work: the disk worker's
    tokens = MirrorTokens.from_state(Path(config.state_dir), clock.seconds)

    # Each labelled child looked up once, not on every request.
    requests: dict[str, Any] = {}

    def count_request(kind: str) -> None:
        counter = requests.get(kind)
        if counter is None:
            counter = requests[kind] = metrics.requests.labels(kind)
        counter.inc()

    in_flight = InFlight(lambda: store is not None and metrics.update_cache(store))
    fleet = None
    if store is not None:
        fleet = build_fleet(
            config, reactor, store, in_flight, hashers("sha256").run, role.runs_singletons
        )
    if fleet is not None:
        metrics.watch_fleet(fleet.status)
    targets: dict[str, TokenTarget] = {}
    checks: dict[str, AccessChecks] = {}
    served: dict[str, tuple[Registry, Backend]] = {}
    for name, registry in config.registries.items():
        chain = UpstreamChain(
            registry.upstreams,
            follower,
            config.rate_limit_seconds,
            clock,
            on_rate_limited=lambda upstream: metrics.upstream_429.labels(upstream).inc(),
            on_answer=metrics.saw_answer,
            account=account_of(registry),
            quota_reserve=config.quota_reserve,
        )
        realms = RealmBook()
        for url in registry.upstreams:
            if url in KNOWN_REALMS:
                realms.learn(KNOWN_REALMS[url])
        targets[name] = TokenTarget(registry, chain, realms)
        checks[name] = access_checks(config, targets[name], follower, clock)
        backend = build_backend(
            config,
            targets[name],
            store,
            follower,
            clock,
            metrics,
            hashers,
            in_flight,
            checks[name],
            fleet,
        )
        served[name] = (registry, backend)
    metrics.watch(store, in_flight)
    history = History(
        lambda: totals(metrics),
        clock,
        **({"ring": share.ring, "sampler": share.sampler} if share else {}),
    )
    figures = FiguresAccess(config.metrics.allow)
    status = StatusSource(
        metrics,
        history,
        clock,
        {name: target.chain for name, target in targets.items()},
        store,
        in_flight,
        fleet.status if fleet is not None else None,
    )

    def usage(request: Request) -> bytes:
        if figures.allows(request):
            return render_usage(config, note, request, status.render)
        return render_usage(config, note, request)

    site = build_site(
        registry_proxy=RegistryProxy(
            Router(served, config.default_registry),
            count_request,
            ClientAuth(
                tokens,
                {name: target.realms for name, target in targets.items()},
                {name: (target.chain, checks[name]) for name, target in targets.items()},
            ),
        ),
        token_proxy=TokenProxy(
            list(targets.values()),
            follower,
            clock,
            config.timeouts,
            tokens,
            count_request,
        ),
        usage=usage,
        metrics=MetricsResource(metrics, figures.allows),
        reactor=reactor,
        client_idle=config.timeouts.client_idle,
        guard=Guard(
            config.access, login, now=clock.seconds, tokens=tokens, table=share and share.table
        ),
    )
    served: dict[str, Any] = {}

    def count_body(source: str, size: int) -> None:
        counter = served.get(source)
        if counter is None:
            counter = served[source] = metrics.bytes_served.labels(source)
        counter.inc(size)

    site.count_body = count_body
    if config.access_log:
        site.combined_log = CombinedLog(Path(config.access_log))
    if fleet is not None and fleet.resource is not None:
        mount_internal(site, b"fleet", fleet.resource)
    return Wiring(site, targets, store, metrics, history, in_flight, fleet)


def build_service(
    config: Config,
    reactor: Any,
    load: Callable[[], Config] | None = None,
    role: Role | None = None,
    inherited: Inherited | None = None,
    tell: Callable[[str], object] = notify,
) -> MirrordService:
    """Wire configuration, TLS, upstreams and resources into one service:
    the one process, or (``inherited`` sockets, a ``role``) one worker,
    which adopts the supervisor's sockets instead of binding, tells it its
    state (``tell``) instead of systemd, and runs the jobs that must run
    once per host only if ``role.runs_singletons``."""
    role = role or Role()
    cert, key, note = certificate(config)
    acme_by = config.acme_challenge if config.acme_domains else None
    responder = None
    if acme_by == "tls-alpn-01":
        # Worker 1 runs ACME; the validator may reach any worker.
        shared = role.shared_dir / "acme-alpn" if role.shared_dir is not None else None
        responder = ALPNResponder(shared, config.acme_domains)
    server_tls = ServerTLS(
        make_context(cert, key, config.tls_min_version, config.tls_ciphers),
        responder.install if responder else None,
    )
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = config.pool_size
    raise_mmap_threshold()
    endpoints = UpstreamEndpoints(reactor, upstream_policy(config), config.timeouts.connect)
    hash_worker = HashWorker(reactor)
    login_worker = LoginWorker(reactor)
    agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
    wiring = wire(config, agent, reactor, note, hash_worker.hasher, login_worker.run)
    chains = {name: target.chain for name, target in wiring.targets.items()}
    reload = reloader(load or (lambda: config), config, server_tls, chains)
    service = MirrordService(
        reactor, pool, wiring.site, config.grace_period, reload, hash_worker, login_worker, tell
    )
    if role.runs_singletons:
        wiring.history.setServiceParent(service)
    if wiring.fleet is not None:
        wiring.fleet.service.setServiceParent(service)
    if wiring.store is not None and role.runs_singletons:
        admin_service(
            reactor, Path(config.state_dir), wiring.store, hash_worker.run, config.cache.pinned
        ).setServiceParent(service)
    if acme_by is not None and role.runs_singletons:
        http = HTTP01Responder() if acme_by == "http-01" else None
        acme = AcmeService(
            config,
            reactor,
            server_tls,
            Issuer(config, responder, http).issue,
            lambda path: make_context(path, path, config.tls_min_version, config.tls_ciphers),
            renewed=(lambda: tell("RENEWED=1")) if role.is_worker else lambda: None,
        )
        acme.setName("acme")
        acme.setServiceParent(service)
        if http is not None:
            endpoint: IStreamServerEndpoint = serverFromString(
                reactor, listen_description(config.acme_http_listen)
            )
            if inherited is not None:
                # Worker 1 alone has the port-80 socket: it holds the answers.
                assert inherited.http01 is not None
                endpoint = AdoptedEndpoint(reactor, inherited.http01)
            plain = StreamServerEndpointService(endpoint, challenge_site(http))
            plain._raiseSynchronously = True
            plain.setName(f"acme http-01 {config.acme_http_listen}")
            plain.setServiceParent(service)
    first: RecordingEndpoint | None = None
    for entry, endpoint in listeners(config, reactor, inherited):
        if first is None:
            endpoint = first = RecordingEndpoint(endpoint)
        listener = StreamServerEndpointService(
            endpoint, LargeWriteTLSFactory(server_tls, False, wiring.site)
        )
        listener._raiseSynchronously = True
        listener.setName(f"listen {entry}")
        listener.setServiceParent(service)
    if config.cache.warm and not config.cache.enabled:
        log.warn("[cache] warm ignored: the cache is off, a warm pull would only spend quota")
    elif config.cache.warm and first is not None and role.runs_singletons:
        warm = build_warm_service(
            reactor,
            [parse_image(text) for text in config.cache.warm],
            config.cache.warm_interval,
            first,
            lambda: server_tls.context,
            # Longer than the mirror's own waits upstream, so that its
            # fallbacks and stale answers reach the warm run, as a client's.
            4 * config.timeouts.response,
            2 * config.timeouts.body_idle,
        )
        warm.setServiceParent(service)  # after the listeners: started after them
    for registry in config.registries.values():
        log.info(
            "serving {registry} from {upstreams}{hosts}",
            registry=registry.name,
            upstreams=", ".join(registry.upstreams),
            hosts=f" (also as host {', '.join(registry.hosts)})" if registry.hosts else "",
        )
    log.info("listening on {listen}", listen=", ".join(config.listen))
    return service


def listeners(
    config: Config, reactor: Any, inherited: Inherited | None
) -> list[tuple[str, IStreamServerEndpoint]]:
    """The listen entries' endpoints, or a worker's inherited sockets
    (which a reload that changed ``listen`` does not change)."""
    if inherited is None:
        return [
            (entry, serverFromString(reactor, listen_description(entry))) for entry in config.listen
        ]
    return [(sock.entry, AdoptedEndpoint(reactor, sock)) for sock in inherited.listeners]


def bind(reactor: Any, entry: str) -> Any:
    """Bind and listen on ``entry`` without ever accepting here: the
    supervisor's socket, which its workers accept from."""
    ports: list[Any] = []
    failures: list[Any] = []
    endpoint = serverFromString(reactor, listen_description(entry))
    never = Factory.forProtocol(Protocol)
    never.noisy = False
    endpoint.listen(never).addCallbacks(ports.append, failures.append)
    if failures:
        failures[0].raiseException()
    port = ports[0]
    port.stopReading()
    return port


def bind_all(reactor: Any, config: Config) -> list[Bound]:
    """Every listener, and ACME's http-01 one when configured."""
    from twisted.internet.error import CannotListenError

    bound: list[Bound] = []
    try:
        for entry in config.listen:
            bound.append(Bound(entry, bind(reactor, entry)))
        if config.acme_domains and config.acme_challenge == "http-01":
            entry = config.acme_http_listen
            bound.append(Bound(entry, bind(reactor, entry), http01=True))
    except CannotListenError as e:
        for item in bound:
            item.port.stopListening()
        raise SystemExit(
            f"mirrord: cannot listen on {e.interface or '*'}:{e.port}: {e.socketError}"
        ) from None
    return bound


class ConfigSnapshot:
    """The configuration file as the supervisor last found it good, copied
    to ``<shared_dir>/config.toml``: the file every worker reads, at start
    and on reload, so that a broken file on disk never reaches a worker,
    not even one started after the refused reload."""

    def __init__(self, options: Options, path: Path) -> None:
        self.options = options
        self.path = path
        self.text = b""
        self.check()

    def check(self) -> Config:
        """Read the source file and check it as a start would; keep it
        (and write the copy) when good, or raise what is wrong."""
        source = self.options.source()
        text = source.read_bytes() if source is not None else b""
        config = self.options.overrides(
            configuration.parse(text, str(source or "the built-in defaults"))
        )
        checked(config)
        self.text = text
        if self.path.parent.is_dir():
            self.write()
        return config

    def write(self) -> None:
        partial = self.path.with_name(self.path.name + ".new")
        partial.write_bytes(self.text)
        os.replace(partial, self.path)


def build_supervisor(options: Options, config: Config, reactor: Any) -> Supervisor:
    """``workers`` > 1: the parent that binds and supervises."""
    shared_dir = Path(config.state_dir) / "workers"
    snapshot = ConfigSnapshot(options, shared_dir / "config.toml")
    log.info(
        "starting {count} workers on {listen}",
        count=config.workers,
        listen=", ".join(config.listen),
    )
    return Supervisor(
        reactor,
        config.workers,
        shared_dir,
        lambda: bind_all(reactor, config),
        Launcher(reactor, options.worker_argv(snapshot.path), config.workers, shared_dir),
        snapshot.check,
        config.grace_period,
        prepare=snapshot.write,
    )


def build_worker(options: Options, reactor: Any, role: Role) -> MirrordService:
    """A worker process the supervisor started. Without sockets handed down
    (a worker started by hand beside others, as the tests of what workers
    share do) it binds its own ``listen`` entries and has no parent to tell."""
    if not Inherited.present():
        return build_service(options["mirrord"], reactor, options.load, role)
    inherited = Inherited.from_environ()
    die_with_parent(inherited.parent_pid)
    return build_service(
        options["mirrord"],
        reactor,
        options.load,
        role,
        inherited,
        ParentChannel(inherited.control_fd),
    )


def makeService(options: Options) -> MirrordService | Supervisor:
    from twisted.internet import reactor

    config: Config = options["mirrord"]
    role = Role.from_environ()
    try:
        if role.is_worker:
            return build_worker(options, reactor, role)
        if config.workers > 1:
            return build_supervisor(options, config, reactor)
        return build_service(config, reactor, options.load)
    except (CertificateError, ConfigError, OSError, ValueError) as e:
        # A startup problem is the operator's to fix: say what, not where in
        # our code.
        sys.exit(f"mirrord: {e}")
