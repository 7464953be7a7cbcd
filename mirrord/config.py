"""Typed, frozen configuration records and loading them from TOML.

No Twisted here: this module only turns a file and command-line overrides
into a validated ``Config``, or one ``ConfigError`` that names the key and
the file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mirrord.daemon.role import usable_cores
from mirrord.passwords import valid_hash
from mirrord.registry.imageref import parse_image

DEFAULT_CONFIG_PATH = Path("/etc/mirrord/mirrord.toml")
DOCKER_HUB = "docker.io"
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"


_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_size(text: str | int) -> int:
    """``"50GiB"``, ``"500MB"``, ``1024`` → bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.fullmatch(text)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    number, unit = float(match.group(1)), match.group(2).lower()
    base = unit[:1]
    factor = 1024 ** "bkmgt".index(base) if "i" in unit and base else _UNITS[base]
    return int(number * factor)


class ConfigError(Exception):
    """A configuration problem, phrased for the person who wrote the file."""


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for each stage before giving up."""

    connect: float = 10.0
    response: float = 30.0
    body_idle: float = 60.0
    client_idle: float = 300.0


@dataclass(frozen=True)
class CacheConfig:
    """The blob and manifest cache under ``state_dir/cache``."""

    enabled: bool = True
    max_size: int = 50 << 30
    high_watermark: float = 0.95
    low_watermark: float = 0.85
    stale_max_age: float = 7 * 24 * 3600.0
    fill_timeout: float = 600.0
    auth_ttl: float = 300.0
    # Seconds a tag revalidated upstream is answered from the cache without
    # asking again (0: every pull asks). See README ("Tags").
    tag_ttl: float = 60.0
    # Times a fill cut off upstream resumes with Range (0: a cut fails it).
    resume_attempts: int = 3
    pinned: tuple[str, ...] = ()
    # Images pulled through the mirror at start and every warm_interval
    # seconds ("name:tag" or "name@sha256:..."). See README ("Warm images").
    warm: tuple[str, ...] = ()
    warm_interval: float = 6 * 3600.0
    # Where the cache lives (relative to ``state_dir``): another disk, or one
    # directory several daemons share (each fill is still made once).
    path: str = "cache"


@dataclass(frozen=True)
class StoreConfig:
    """Where verified blobs, manifests and tag records are kept for every
    host: ``disk`` (the cache directory alone) or ``s3`` (a bucket a fleet
    shares, behind each host's own disk cache, which stays its first tier)."""

    backend: str = "disk"
    endpoint: str = ""
    bucket: str = ""
    region: str = "us-east-1"
    prefix: str = ""
    access_key: str = ""
    secret_key_file: str = ""
    tls_ca: str = ""
    # Answer blob hits the bucket holds (and this host does not) with a 307
    # to a presigned URL valid for ``redirect_ttl`` seconds.
    redirect: bool = False
    redirect_ttl: float = 600.0
    # The bucket's cap (0: none), enforced by last access across the fleet.
    max_size: int = 0
    # Every S3 call's bound; after ``breaker_failures`` misses in a row the
    # bucket is skipped for ``breaker_reset`` seconds.
    deadline: float = 10.0
    breaker_failures: int = 3
    breaker_reset: float = 30.0
    part_size: int = 16 << 20


@dataclass(frozen=True)
class FleetConfig:
    """Coordination between the hosts of a fleet: a lease per digest in
    Redis names the one host fetching it; the others stream from that
    host's fill over ``/_mirrord/fleet/`` (HMAC-signed with the shared
    secret, over TLS). Without ``redis`` each host fills on its own."""

    redis: str = ""
    advertise: str = ""
    secret_file: str = ""
    # The CA that issued the members' certificates (default: the system's).
    tls_ca: str = ""
    # This host's name among the members (default: the host name).
    member: str = ""
    lease_ttl: float = 30.0
    deadline: float = 2.0


@dataclass(frozen=True)
class Access:
    """Who may use the mirror: it must not be an open relay for the world."""

    block_user_agents: tuple[str, ...] = ()
    allow_clients: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    max_connections_per_client: int = 0
    max_requests_per_client: int = 0
    retry_after: int = 10
    users: Mapping[str, str] = field(default_factory=dict)
    max_failed_logins: int = 10
    failed_login_window: float = 300.0


@dataclass(frozen=True)
class MetricsAccess:
    """Who may read ``/metrics`` and the status figures on ``/``: addresses
    or CIDRs, checked against the client address the guard computes
    (``X-Forwarded-For`` from trusted proxies resolved). Loopback only by
    default: the figures name upstreams and traffic, not for the world."""

    allow: tuple[str, ...] = ("127.0.0.1/32", "::1/128")


@dataclass(frozen=True)
class Registry:
    """One registry the mirror serves and its ordered chain of upstreams."""

    name: str
    upstreams: tuple[str, ...]
    official_prefix: str = ""
    hosts: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    # The mirror's own account with the first upstream: tokens for anonymous
    # clients are fetched with it. The password (or a Docker Hub access
    # token) comes from ``password`` or, better, ``password_file``.
    username: str = ""
    password: str = field(default="", repr=False)
    password_file: str = ""

    def account_password(self) -> str:
        """The password, read from ``password_file`` when one is set."""
        if not self.password_file:
            return self.password
        try:
            return Path(self.password_file).read_text().strip()
        except OSError as e:
            raise ConfigError(
                f"registry {self.name!r}: cannot read password_file {self.password_file}: "
                f"{e.strerror or e}"
            ) from None


PRESET_UPSTREAMS: Mapping[str, Registry] = {
    DOCKER_HUB: Registry(DOCKER_HUB, ("https://registry-1.docker.io",), "library"),
    "ghcr.io": Registry("ghcr.io", ("https://ghcr.io",)),
    "quay.io": Registry("quay.io", ("https://quay.io",)),
    "registry.k8s.io": Registry("registry.k8s.io", ("https://registry.k8s.io",)),
    "gcr.io": Registry("gcr.io", ("https://gcr.io",)),
    "mcr.microsoft.com": Registry("mcr.microsoft.com", ("https://mcr.microsoft.com",)),
    "nvcr.io": Registry("nvcr.io", ("https://nvcr.io",)),
}


@dataclass(frozen=True)
class Config:
    """Everything the daemon needs to know, with the embedded defaults."""

    listen: tuple[str, ...] = ("443",)
    cert: str = ""
    key: str = ""
    state_dir: str = "/var/lib/mirrord"
    tls_min_version: str = "1.2"
    tls_ciphers: str = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!MD5:!DSS"
    upstream_ca: str = ""
    max_redirects: int = 5
    rate_limit_seconds: float = 60.0
    # Pulls left in an upstream's window at which the mirror's manifest GETs
    # go to the next upstream before a 429 (HEADs are free and stay).
    quota_reserve: int = 5
    pool_size: int = 16
    grace_period: float = 30.0
    # Processes serving the listeners (1: one process, no supervisor); by
    # default one per core this process may use. See README ("Workers").
    workers: int = field(default_factory=usable_cores)
    access_log: str = ""
    default_registry: str = DOCKER_HUB
    # Certificates by ACME (TLS-ALPN-01 on the listener): see README.
    acme_domains: tuple[str, ...] = ()
    acme_email: str = ""
    acme_directory: str = LETS_ENCRYPT
    acme_ca: str = ""
    acme_challenge: str = "tls-alpn-01"
    acme_http_listen: str = "80"
    acme_renew_before: float = 30 * 24 * 3600.0
    acme_retry_after: float = 60.0
    timeouts: Timeouts = field(default_factory=Timeouts)
    cache: CacheConfig = field(default_factory=CacheConfig)
    access: Access = field(default_factory=Access)
    metrics: MetricsAccess = field(default_factory=MetricsAccess)
    store: StoreConfig = field(default_factory=StoreConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    # Served registries: Docker Hub unless configured otherwise; a preset
    # (ghcr.io, quay.io, ...) is served once its table exists, even empty.
    registries: Mapping[str, Registry] = field(
        default_factory=lambda: {DOCKER_HUB: PRESET_UPSTREAMS[DOCKER_HUB]}
    )

    @property
    def default(self) -> Registry:
        return self.registries[self.default_registry]


_TOP_LEVEL_TYPES: dict[str, type | tuple[type, ...]] = {
    "listen": list,
    "cert": str,
    "key": str,
    "state_dir": str,
    "tls_min_version": str,
    "tls_ciphers": str,
    "upstream_ca": str,
    "max_redirects": int,
    "rate_limit_seconds": (int, float),
    "quota_reserve": int,
    "pool_size": int,
    "grace_period": (int, float),
    "workers": int,
    "access_log": str,
    "default_registry": str,
    "acme_domains": list,
    "acme_email": str,
    "acme_directory": str,
    "acme_ca": str,
    "acme_challenge": str,
    "acme_http_listen": (str, int),
    "acme_renew_before": (int, float),
    "acme_retry_after": (int, float),
    "timeouts": dict,
    "cache": dict,
    "access": dict,
    "metrics": dict,
    "store": dict,
    "fleet": dict,
    "registries": dict,
}
_ACCESS_TYPES: dict[str, type | tuple[type, ...]] = {
    "block_user_agents": list,
    "allow_clients": list,
    "trusted_proxies": list,
    "max_connections_per_client": int,
    "max_requests_per_client": int,
    "retry_after": int,
    "users": dict,
    "max_failed_logins": int,
    "failed_login_window": (int, float),
}
_STORE_TYPES: dict[str, type | tuple[type, ...]] = {
    "backend": str,
    "endpoint": str,
    "bucket": str,
    "region": str,
    "prefix": str,
    "access_key": str,
    "secret_key_file": str,
    "tls_ca": str,
    "redirect": bool,
    "redirect_ttl": (int, float),
    "max_size": (str, int),
    "deadline": (int, float),
    "breaker_failures": int,
    "breaker_reset": (int, float),
    "part_size": (str, int),
}
_FLEET_TYPES: dict[str, type | tuple[type, ...]] = {
    "redis": str,
    "advertise": str,
    "secret_file": str,
    "tls_ca": str,
    "member": str,
    "lease_ttl": (int, float),
    "deadline": (int, float),
}
STORE_BACKENDS = ("disk", "s3")
_METRICS_TYPES: dict[str, type | tuple[type, ...]] = {"allow": list}
_CACHE_TYPES: dict[str, type | tuple[type, ...]] = {
    "enabled": bool,
    "max_size": (str, int),
    "high_watermark": (int, float),
    "low_watermark": (int, float),
    "stale_max_age": (int, float),
    "fill_timeout": (int, float),
    "auth_ttl": (int, float),
    "tag_ttl": (int, float),
    "resume_attempts": int,
    "pinned": list,
    "warm": list,
    "warm_interval": (int, float),
    "path": str,
}
_REGISTRY_TYPES: dict[str, type | tuple[type, ...]] = {
    "upstreams": list,
    "official_prefix": str,
    "hosts": list,
    "allow": list,
    "deny": list,
    "username": str,
    "password": str,
    "password_file": str,
}
TLS_VERSIONS = ("1.2", "1.3")
ACME_CHALLENGES = ("tls-alpn-01", "http-01")


def _check_type(where: str, key: str, value: Any, expected: Any) -> None:
    # bool is an int in Python; a TOML ``true`` for a number is still wrong.
    wants_bool = expected is bool
    if isinstance(value, bool) != wants_bool or not isinstance(value, expected):
        names = (
            " or ".join(t.__name__ for t in expected)
            if isinstance(expected, tuple)
            else expected.__name__
        )
        kind = {"list": "array", "dict": "table", "str": "string"}.get(names, names)
        raise ConfigError(f"{where}: key {key!r} must be a {kind}, not {value!r}")


def _check_keys(where: str, table: Mapping[str, Any], allowed: Mapping) -> None:
    for key, value in table.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r} (known keys: {', '.join(allowed)})")
        _check_type(where, key, value, allowed[key])


def check_upstream_url(where: str, url: str) -> str:
    """An upstream is an http(s) origin, optionally with a path prefix."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: upstream {url!r} must be an http:// or https:// URL")
    if parts.query or parts.fragment:
        raise ConfigError(f"{where}: upstream {url!r} must not have a query")
    return url.rstrip("/")


def _registry(where: str, name: str, table: Mapping[str, Any]) -> Registry:
    where = f"{where} [registries.{name!r}]"
    _check_keys(where, table, _REGISTRY_TYPES)
    preset = PRESET_UPSTREAMS.get(name)
    upstreams = table.get("upstreams", preset.upstreams if preset else None)
    if not upstreams:
        raise ConfigError(f"{where}: key 'upstreams' needs at least one URL")
    for url in upstreams:
        _check_type(where, "upstreams", url, str)
    prefix = table.get("official_prefix", preset.official_prefix if preset else "")
    lists = {key: _strings(where, key, table.get(key, [])) for key in ("hosts", "allow", "deny")}
    chain = tuple(check_upstream_url(where, u) for u in upstreams)
    for key in ("username", "password", "password_file"):
        _check_type(where, key, table.get(key, ""), str)
    username = table.get("username", "")
    if bool(username) != bool(table.get("password") or table.get("password_file")):
        raise ConfigError(f"{where}: 'username' needs 'password' or 'password_file', and back")
    if table.get("password") and table.get("password_file"):
        raise ConfigError(f"{where}: set 'password' or 'password_file', not both")
    registry = Registry(
        name,
        chain,
        prefix,
        tuple(h.lower() for h in lists["hosts"]),
        lists["allow"],
        lists["deny"],
        username,
        table.get("password", ""),
        table.get("password_file", ""),
    )
    if registry.password_file:
        registry.account_password()  # unreadable: say so now, not at the first pull
    return registry


def _strings(where: str, key: str, values: list[Any]) -> tuple[str, ...]:
    for value in values:
        _check_type(where, key, value, str)
    return tuple(values)


def _networks(where: str, key: str, values: list[Any]) -> tuple[str, ...]:
    for network in _strings(where, key, values):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"{where}: {key} {network!r} is not an address or CIDR") from None
    return tuple(values)


def _metrics(where: str, table: Mapping[str, Any]) -> MetricsAccess:
    _check_keys(where, table, _METRICS_TYPES)
    if "allow" not in table:
        return MetricsAccess()
    return MetricsAccess(allow=_networks(where, "allow", table["allow"]))


def _access(where: str, table: Mapping[str, Any]) -> Access:
    _check_keys(where, table, _ACCESS_TYPES)
    values: dict[str, Any] = dict(table)
    for key in ("block_user_agents", "allow_clients", "trusted_proxies"):
        values[key] = _strings(where, key, table.get(key, []))
    for pattern in values["block_user_agents"]:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{where}: block_user_agents {pattern!r}: {e}") from None
    for key in ("allow_clients", "trusted_proxies"):
        for network in values[key]:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ConfigError(f"{where}: {key} {network!r} is not an address or CIDR") from None
    for user, stored in values.get("users", {}).items():
        _check_type(f"{where} [access.users]", user, stored, str)
        if not valid_hash(stored):
            raise ConfigError(
                f"{where} [access.users]: {user!r} needs a hash from `python -m mirrord.passwords`"
            )
    for key in (
        "max_connections_per_client",
        "max_requests_per_client",
        "retry_after",
        "max_failed_logins",
    ):
        if values.get(key, 0) < 0:
            raise ConfigError(f"{where}: key {key!r} must be >= 0")
    if "failed_login_window" in values:
        if values["failed_login_window"] <= 0:
            raise ConfigError(f"{where}: key 'failed_login_window' must be positive")
        values["failed_login_window"] = float(values["failed_login_window"])
    return Access(**values)


def from_mapping(data: Mapping[str, Any], where: str = "configuration") -> Config:
    """Validate a parsed TOML document into a ``Config``."""
    _check_keys(where, data, _TOP_LEVEL_TYPES)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key == "timeouts":
            _check_keys(
                f"{where} [timeouts]",
                value,
                {f.name: (int, float) for f in dataclasses.fields(Timeouts)},
            )
            for name, seconds in value.items():
                if seconds <= 0:
                    raise ConfigError(f"{where} [timeouts]: key {name!r} must be positive")
            values[key] = Timeouts(**{k: float(v) for k, v in value.items()})
        elif key == "cache":
            values[key] = _cache(f"{where} [cache]", value)
        elif key == "access":
            values[key] = _access(f"{where} [access]", value)
        elif key == "metrics":
            values[key] = _metrics(f"{where} [metrics]", value)
        elif key == "store":
            values[key] = _store(f"{where} [store]", value)
        elif key == "fleet":
            values[key] = _fleet(f"{where} [fleet]", value)
        elif key == "registries":
            registries = {DOCKER_HUB: PRESET_UPSTREAMS[DOCKER_HUB]}
            for name, table in value.items():
                _check_type(f"{where} [registries]", name, table, dict)
                registries[name] = _registry(where, name, table)
            values[key] = registries
        elif key == "listen":
            values[key] = tuple(_listen_entry(where, v) for v in value)
        elif key == "acme_http_listen":
            values[key] = _listen_entry(where, value)
        elif key == "acme_domains":
            values[key] = tuple(_acme_domain(where, v) for v in value)
        elif key in ("acme_renew_before", "acme_retry_after"):
            if value <= 0:
                raise ConfigError(f"{where}: key {key!r} must be positive")
            values[key] = float(value)
        else:
            values[key] = value
    config = Config(**values)
    return _check_config(where, config)


def _cache(where: str, table: Mapping[str, Any]) -> CacheConfig:
    _check_keys(where, table, _CACHE_TYPES)
    values = dict(table)
    if "max_size" in values:
        try:
            values["max_size"] = parse_size(values["max_size"])
        except ValueError:
            raise ConfigError(
                f"{where}: key 'max_size' must be a size like \"50GiB\", not {table['max_size']!r}"
            ) from None
    if "pinned" in values:
        for pattern in values["pinned"]:
            _check_type(where, "pinned", pattern, str)
        values["pinned"] = tuple(values["pinned"])
    if "warm" in values:
        for image in values["warm"]:
            _check_type(where, "warm", image, str)
            try:
                parse_image(image)
            except ValueError as e:
                raise ConfigError(f"{where}: key 'warm': {e}") from None
        values["warm"] = tuple(values["warm"])
    cache = CacheConfig(**values)
    if not 0 < cache.low_watermark <= cache.high_watermark <= 1:
        raise ConfigError(f"{where}: need 0 < low_watermark <= high_watermark <= 1")
    for key in ("stale_max_age", "fill_timeout", "auth_ttl", "warm_interval"):
        if getattr(cache, key) <= 0:
            raise ConfigError(f"{where}: key {key!r} must be positive")
    if cache.tag_ttl < 0:
        raise ConfigError(f"{where}: key 'tag_ttl' must not be negative")
    if cache.resume_attempts < 0:
        raise ConfigError(f"{where}: key 'resume_attempts' must not be negative")
    return cache


def _size_key(where: str, table: Mapping[str, Any], key: str) -> int:
    try:
        return parse_size(table[key])
    except ValueError:
        raise ConfigError(
            f'{where}: key {key!r} must be a size like "50GiB", not {table[key]!r}'
        ) from None


def _store(where: str, table: Mapping[str, Any]) -> StoreConfig:
    _check_keys(where, table, _STORE_TYPES)
    values = dict(table)
    for key in ("max_size", "part_size"):
        if key in values:
            values[key] = _size_key(where, table, key)
    store = StoreConfig(**values)
    if store.backend not in STORE_BACKENDS:
        raise ConfigError(f"{where}: key 'backend' must be one of {', '.join(STORE_BACKENDS)}")
    for key in ("redirect_ttl", "deadline", "breaker_reset"):
        if getattr(store, key) <= 0:
            raise ConfigError(f"{where}: key {key!r} must be positive")
    if store.breaker_failures < 1:
        raise ConfigError(f"{where}: key 'breaker_failures' must be >= 1")
    if not 5 << 20 <= store.part_size <= 5 << 30:
        raise ConfigError(f"{where}: key 'part_size' must be between 5MiB and 5GiB (S3's limits)")
    if store.max_size < 0:
        raise ConfigError(f"{where}: key 'max_size' must not be negative")
    if store.backend == "s3":
        for key in ("endpoint", "bucket", "access_key", "secret_key_file"):
            if not getattr(store, key):
                raise ConfigError(f'{where}: backend "s3" needs key {key!r}')
        if urlsplit(store.endpoint).scheme not in ("http", "https"):
            raise ConfigError(f"{where}: key 'endpoint' must be an http:// or https:// URL")
    return store


def _fleet(where: str, table: Mapping[str, Any]) -> FleetConfig:
    _check_keys(where, table, _FLEET_TYPES)
    fleet = FleetConfig(**table)
    for key in ("lease_ttl", "deadline"):
        if getattr(fleet, key) <= 0:
            raise ConfigError(f"{where}: key {key!r} must be positive")
    if fleet.redis:
        if urlsplit(fleet.redis).scheme != "redis":
            raise ConfigError(f"{where}: key 'redis' must be a redis://host:port/db URL")
        if urlsplit(fleet.advertise).scheme != "https" or not urlsplit(fleet.advertise).hostname:
            raise ConfigError(
                f"{where}: with 'redis', key 'advertise' must be this host's https:// address"
            )
        if not fleet.secret_file:
            raise ConfigError(f"{where}: with 'redis', key 'secret_file' is needed")
    return fleet


def _listen_entry(where: str, value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    _check_type(where, "listen", value, str)
    return value


_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN_RE = re.compile(rf"(?=.{{1,253}}$)({_LABEL}\.)*{_LABEL}")


def _acme_domain(where: str, value: Any) -> str:
    """A DNS name TLS-ALPN-01 can validate: no wildcard, no address."""
    _check_type(where, "acme_domains", value, str)
    name = value.lower().rstrip(".")
    if not _DOMAIN_RE.fullmatch(name) or name.replace(".", "").isdigit():
        raise ConfigError(f"{where}: acme_domains {value!r} is not a DNS name (no wildcards)")
    return name


def _check_config(where: str, config: Config) -> Config:
    if not config.listen:
        raise ConfigError(f"{where}: key 'listen' needs at least one address")
    if config.tls_min_version not in TLS_VERSIONS:
        raise ConfigError(
            f"{where}: key 'tls_min_version' must be one of {', '.join(TLS_VERSIONS)}"
        )
    if bool(config.cert) != bool(config.key):
        raise ConfigError(f"{where}: keys 'cert' and 'key' must be given together")
    if config.default_registry not in config.registries:
        raise ConfigError(
            f"{where}: key 'default_registry' names {config.default_registry!r}, "
            "which is not a configured registry"
        )
    if config.acme_challenge not in ACME_CHALLENGES:
        raise ConfigError(
            f"{where}: key 'acme_challenge' must be one of {', '.join(ACME_CHALLENGES)}"
        )
    if urlsplit(config.acme_directory).scheme != "https":
        raise ConfigError(f"{where}: key 'acme_directory' must be an https:// URL")
    if config.max_redirects < 0 or config.pool_size < 0 or config.quota_reserve < 0:
        raise ConfigError(f"{where}: 'max_redirects', 'pool_size', 'quota_reserve' must be >= 0")
    if config.store.backend != "disk" and not config.cache.enabled:
        raise ConfigError(
            f"{where}: [store] backend {config.store.backend!r} needs the disk cache "
            "([cache] enabled = true): fills spool to it"
        )
    if config.workers < 1:
        raise ConfigError(f"{where}: key 'workers' must be >= 1, not {config.workers}")
    return config


def load(path: Path | None) -> Config:
    """Read a config file; with no path, the default file if it exists."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return parse(text, str(path))


def parse(text: bytes, where: str) -> Config:
    """A configuration file's bytes, validated (``where`` names it)."""
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    return from_mapping(data, where)


def with_overrides(
    config: Config,
    *,
    listen: list[str] | None = None,
    cert: str | None = None,
    key: str | None = None,
    state_dir: str | None = None,
    upstreams: list[str] | None = None,
    workers: int | None = None,
) -> Config:
    """Apply the command line's options on top of the file's values."""
    changes: dict[str, Any] = {}
    if listen:
        changes["listen"] = tuple(listen)
    if cert is not None:
        changes["cert"] = cert
    if key is not None:
        changes["key"] = key
    if state_dir is not None:
        changes["state_dir"] = state_dir
    if workers is not None:
        changes["workers"] = workers
    if upstreams:
        default = config.default
        chain = tuple(check_upstream_url("--upstream", u) for u in upstreams)
        registries = dict(config.registries)
        registries[default.name] = dataclasses.replace(default, upstreams=chain)
        changes["registries"] = registries
    return _check_config("command line", dataclasses.replace(config, **changes))
