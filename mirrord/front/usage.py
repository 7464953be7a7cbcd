"""The usage page: ready-to-paste client configuration for the host the
client reached us by. Every interpolated value is escaped (``Host`` is
attacker-controlled)."""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from twisted.web.server import Request

from mirrord import __version__
from mirrord.config import Config, Registry
from mirrord.metrics import Metrics
from mirrord.registry.respond import client_host


@dataclass(frozen=True)
class CertificateNote:
    """Where the serving certificate came from, for the page and the log."""

    path: str
    self_signed: bool
    fingerprint: str


def _block(title: str, path: str, text: str) -> str:
    where = f" <small>({escape(path)})</small>" if path else ""
    return f"<h2>{escape(title)}{where}</h2>\n<pre>{escape(text)}</pre>\n"


def _registry_section(host: str, registry: Registry, default: str) -> str:
    """Ready-to-paste configuration for one served registry."""
    name = registry.name
    example = "library/alpine" if registry.official_prefix else "owner/image"
    prefix = "" if name == default else f"{name}/"
    pulls = [f"docker pull {host}/{prefix}{example}"]
    pulls += [f"docker pull {alias}/{example}" for alias in registry.hosts]
    parts = [f"<h2>{escape(name)}</h2>"]
    parts.append(_block("Pull directly", "", "\n".join(pulls)))
    if registry.official_prefix:
        parts.append(
            _block(
                "Docker registry-mirrors (Docker Hub only)",
                "/etc/docker/daemon.json",
                f'{{\n  "registry-mirrors": ["https://{host}"]\n}}\n'
                "# then: sudo systemctl restart docker",
            )
        )
    upstream = "docker.io" if registry.official_prefix else name
    parts.append(
        _block(
            "containerd",
            f"/etc/containerd/certs.d/{name}/hosts.toml",
            f'server = "https://{upstream}"\n\n'
            f'[host."https://{host}"]\n'
            '  capabilities = ["pull", "resolve"]\n',
        )
    )
    location = host if name == default else f"{host}/{name}"
    parts.append(
        _block(
            "podman, CRI-O, skopeo",
            "/etc/containers/registries.conf",
            f'[[registry]]\nprefix = "{name}"\nlocation = "{name}"\n\n'
            f'[[registry.mirror]]\nlocation = "{location}"\n',
        )
    )
    chain = "".join(f"<li><code>{escape(u)}</code></li>" for u in registry.upstreams)
    parts.append(f"<p>Upstreams, in order:</p><ol>{chain}</ol>")
    return "\n".join(parts)


def render_usage(
    config: Config, note: CertificateNote, request: Request, metrics: Metrics | None = None
) -> bytes:
    host = client_host(request)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>mirrord at {escape(host)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;}"
        "pre{background:#f4f4f4;padding:1em;overflow:auto}</style></head><body>",
        f"<h1>mirrord at {escape(host)}</h1>",
        "<p>A pull-through mirror of "
        + ", ".join(f"<b>{escape(name)}</b>" for name in config.registries)
        + ".</p>",
    ]
    if note.self_signed:
        parts.append(
            "<p><b>This mirror uses a self-signed certificate</b> "
            f"(SHA-256 {escape(note.fingerprint)}). Clients must trust "
            f"<code>{escape(note.path)}</code>: copy it to "
            f"<code>/etc/docker/certs.d/{escape(host)}/ca.crt</code> (Docker), "
            f"or configure a real certificate with <code>cert</code> and <code>key</code>.</p>"
        )
    for registry in config.registries.values():
        parts.append(_registry_section(host, registry, config.default_registry))
    parts.append(
        _block(
            "containerd, every served registry",
            "/etc/containerd/certs.d/_default/hosts.toml",
            f'[host."https://{host}"]\n  capabilities = ["pull", "resolve"]\n'
            "# containerd adds ?ns=<registry> to each request; registries this\n"
            "# mirror does not serve answer 404 and containerd moves on.\n",
        )
    )
    if metrics is not None:
        rows = "".join(
            f"<tr><td><code>{escape(name)}</code></td><td>{value:g}</td></tr>"
            for name, value in metrics.summary().items()
        )
        parts.append(
            "<h2>Figures</h2><p>Also at <code>/metrics</code> for Prometheus.</p>"
            f"<table>{rows}</table>"
        )
    parts.append(f"<p><small>mirrord {escape(__version__)}</small></p></body></html>\n")
    return "\n".join(parts).encode()
