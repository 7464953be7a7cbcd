"""Which registry a ``/v2/`` request is for.

In order: containerd's ``?ns=<registry>`` (matched against the served
registries, never dialled as given); the ``Host`` the client used (a
registry's ``hosts``, like the seed's second nginx server block); a path
prefix (``/v2/ghcr.io/owner/image/...``, as podman's mirrors with a path
send); else the default registry. A registry that is not served is a 404
``NAME_UNKNOWN``, so containerd moves on to its next host.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from mirrord.config import DOCKER_HUB, Registry
from mirrord.registry import errors

T = TypeVar("T")

ALIASES = {"index.docker.io": DOCKER_HUB, "registry-1.docker.io": DOCKER_HUB}


def looks_like_registry(component: str) -> bool:
    """A first path component naming a registry host (Docker Hub namespaces
    never contain a dot or a colon)."""
    return "." in component or ":" in component or component == "localhost"


@dataclass(frozen=True)
class Route(Generic[T]):
    registry: Registry
    target: T
    path: str  # what follows /v2/ once any registry prefix is gone


class Router(Generic[T]):
    """Maps requests to a served registry and what serves it (``T``)."""

    def __init__(self, registries: Mapping[str, tuple[Registry, T]], default: str) -> None:
        self._registries = registries
        self._default = default
        self._by_host = {
            host: name for name, (registry, _) in registries.items() for host in registry.hosts
        }

    def _named(self, name: str) -> tuple[Registry, T]:
        found = self._registries.get(ALIASES.get(name, name))
        if found is None:
            raise errors.RegistryError(
                404, "NAME_UNKNOWN", f"registry {name!r} is not served by this mirror"
            )
        return found

    def route(self, path: str, host: str | None, ns: str | None) -> Route[T]:
        """``path`` is what follows ``/v2/``."""
        if ns is not None:
            registry, target = self._named(ns.lower())
            first, _, rest = path.partition("/")
            if ALIASES.get(first, first) == registry.name:
                path = rest  # a prefix repeating the ns
            return Route(registry, target, path)
        hostname = host.rsplit(":", 1)[0].lower() if host and host[0] != "[" else ""
        if hostname in self._by_host:
            registry, target = self._registries[self._by_host[hostname]]
            return Route(registry, target, path)
        first, _, rest = path.partition("/")
        if rest and looks_like_registry(first):
            registry, target = self._named(first.lower())
            return Route(registry, target, rest)
        registry, target = self._registries[self._default]
        return Route(registry, target, path)
