"""The usage page: ready-to-paste client configuration for the host the
client reached us by. Every interpolated value is escaped (``Host`` is
attacker-controlled)."""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from twisted.web.server import Request

from mirrord import __version__
from mirrord.config import Config
from mirrord.metrics import Metrics
from mirrord.respond import client_host


@dataclass(frozen=True)
class CertificateNote:
    """Where the serving certificate came from, for the page and the log."""

    path: str
    self_signed: bool
    fingerprint: str


def _block(title: str, path: str, text: str) -> str:
    where = f" <small>({escape(path)})</small>" if path else ""
    return f"<h2>{escape(title)}{where}</h2>\n<pre>{escape(text)}</pre>\n"


def render_usage(
    config: Config, note: CertificateNote, request: Request, metrics: Metrics | None = None
) -> bytes:
    host = client_host(request)
    registry = config.default
    example = "library/alpine" if registry.official_prefix else "owner/image"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>mirrord at {escape(host)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;}"
        "pre{background:#f4f4f4;padding:1em;overflow:auto}</style></head><body>",
        f"<h1>mirrord at {escape(host)}</h1>",
        f"<p>A pull-through mirror of <b>{escape(registry.name)}</b>.</p>",
    ]
    if note.self_signed:
        parts.append(
            "<p><b>This mirror uses a self-signed certificate</b> "
            f"(SHA-256 {escape(note.fingerprint)}). Clients must trust "
            f"<code>{escape(note.path)}</code>: copy it to "
            f"<code>/etc/docker/certs.d/{escape(host)}/ca.crt</code> (Docker), "
            f"or configure a real certificate with <code>cert</code> and <code>key</code>.</p>"
        )
    parts.append(_block("Pull directly", "", f"docker pull {host}/{example}"))
    if registry.official_prefix:
        parts.append(
            _block(
                "Docker registry-mirrors",
                "/etc/docker/daemon.json",
                f'{{\n  "registry-mirrors": ["https://{host}"]\n}}\n'
                "# then: sudo systemctl restart docker",
            )
        )
    parts.append(
        _block(
            "containerd",
            f"/etc/containerd/certs.d/{registry.name}/hosts.toml",
            f'server = "https://{registry.name}"\n\n'
            f'[host."https://{host}"]\n'
            '  capabilities = ["pull", "resolve"]\n',
        )
    )
    parts.append(
        _block(
            "podman, CRI-O, skopeo",
            "/etc/containers/registries.conf",
            f'[[registry]]\nprefix = "{registry.name}"\nlocation = "{registry.name}"\n\n'
            f'[[registry.mirror]]\nlocation = "{host}"\n',
        )
    )
    upstreams = "".join(f"<li><code>{escape(u)}</code></li>" for u in registry.upstreams)
    parts.append(f"<h2>Upstreams, in order</h2><ol>{upstreams}</ol>")
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
