"""The usage page: ready-to-paste client configuration for the host the
client reached us by, in Chinese or English, and the status section for
the clients ``[metrics] allow`` admits.

Every interpolated value is escaped (``Host`` is attacker-controlled, and
so, for this page, is the configuration). Copy buttons are progressive
enhancement: the buttons stay hidden without JavaScript, and the one small
inline script is allowed by its hash in the page's Content-Security-Policy,
so nothing else can run.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from html import escape

from twisted.web.server import Request

from mirrord import __version__
from mirrord.config import Config, Registry
from mirrord.front.texts import TEXTS, language
from mirrord.registry.respond import client_host


@dataclass(frozen=True)
class CertificateNote:
    """Where the serving certificate came from, for the page and the log."""

    path: str
    self_signed: bool
    fingerprint: str


# Unhides the copy buttons and copies the snippet beside each; where the
# clipboard API is missing (plain HTTP), selects the snippet instead.
COPY_SCRIPT = (
    "document.querySelectorAll('button.copy').forEach(function(b){"
    "b.hidden=false;b.addEventListener('click',function(){"
    "var pre=b.parentNode.querySelector('pre');"
    "var done=function(){b.textContent=b.dataset.done;};"
    "if(navigator.clipboard){navigator.clipboard.writeText(pre.textContent).then(done,"
    "function(){});}else{var r=document.createRange();r.selectNodeContents(pre);"
    "var s=window.getSelection();s.removeAllRanges();s.addRange(r);}});});"
)
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(COPY_SCRIPT.encode()).digest()).decode()
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    f"script-src 'sha256-{_SCRIPT_HASH}'; base-uri 'none'; form-action 'none'"
).encode()

STYLE = (
    "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}"
    "pre{background:#f4f4f4;padding:1em;overflow:auto;margin:0}"
    ".snippet{position:relative;margin:.5em 0 1em}"
    ".copy{position:absolute;top:.4em;right:.4em}"
    "nav{float:right}"
    "table.figures{border-collapse:collapse;margin:.5em 0}"
    "table.figures th,table.figures td{text-align:left;padding:.2em 1em .2em 0}"
    ".swatch{display:inline-block;width:.8em;height:.8em;margin:0 .3em 0 1em}"
    ".swatch.cache{background:#2e7d32}.swatch.upstream{background:#1565c0}"
    "figure{margin:.5em 0}figcaption{font-size:.9em;color:#555}"
    "svg.chart{display:block;max-width:100%;height:auto;margin:.2em 0}"
    ".resting{color:#b71c1c}.healthy{color:#2e7d32}"
)


def _block(t: Mapping[str, str], title: str, path: str, text: str) -> str:
    where = f" <small>({escape(path)})</small>" if path else ""
    button = (
        f'<button type="button" class="copy" hidden data-done="{escape(t["copied"])}">'
        f"{escape(t['copy'])}</button>"
    )
    return (
        f"<h3>{escape(title)}{where}</h3>\n"
        f'<div class="snippet">{button}<pre>{escape(text)}</pre></div>\n'
    )


def _registry_section(t: Mapping[str, str], host: str, registry: Registry, default: str) -> str:
    """Ready-to-paste configuration for one served registry."""
    name = registry.name
    example = "library/alpine" if registry.official_prefix else "owner/image"
    prefix = "" if name == default else f"{name}/"
    pulls = [f"docker pull {host}/{prefix}{example}"]
    pulls += [f"docker pull {alias}/{example}" for alias in registry.hosts]
    parts = [f"<h2>{escape(name)}</h2>"]
    parts.append(_block(t, t["pull_directly"], "", "\n".join(pulls)))
    if registry.official_prefix:
        parts.append(
            _block(
                t,
                t["docker_mirrors"],
                "/etc/docker/daemon.json",
                f'{{\n  "registry-mirrors": ["https://{host}"]\n}}\n{t["then_restart"]}',
            )
        )
    upstream = "docker.io" if registry.official_prefix else name
    parts.append(
        _block(
            t,
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
            t,
            "podman, CRI-O, skopeo",
            "/etc/containers/registries.conf",
            f'[[registry]]\nprefix = "{name}"\nlocation = "{name}"\n\n'
            f'[[registry.mirror]]\nlocation = "{location}"\n',
        )
    )
    chain = "".join(f"<li><code>{escape(u)}</code></li>" for u in registry.upstreams)
    parts.append(f"<p>{escape(t['upstreams_in_order'])}</p><ol>{chain}</ol>")
    return "\n".join(parts)


def render_usage(
    config: Config,
    note: CertificateNote,
    request: Request,
    status: Callable[[Mapping[str, str]], str] | None = None,
) -> bytes:
    """The page for ``request``; ``status`` renders the status section, and
    is None for clients not allowed to see the figures."""
    host = client_host(request)
    lang = language(request)
    t = TEXTS[lang]
    registries = ", ".join(f"<b>{escape(name)}</b>" for name in config.registries)
    title = escape(t["title"].format(host=host))
    parts = [
        f"<!doctype html><html lang='{t['html_lang']}'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        "<link rel='icon' href='data:,'>",
        f"<title>{title}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<nav><a href='?lang={t['switch_lang']}' hreflang='{t['switch_lang']}' "
        f"lang='{t['switch_lang']}'>{t['switch']}</a></nav>",
        f"<h1>{title}</h1>",
        f"<p>{t['intro'].format(registries=registries)}</p>",
    ]
    if note.self_signed:
        parts.append(
            "<p>"
            + t["self_signed"].format(
                fingerprint=escape(note.fingerprint), path=escape(note.path), host=escape(host)
            )
            + "</p>"
        )
    if status is not None:
        parts.append(status(t))
    for registry in config.registries.values():
        parts.append(_registry_section(t, host, registry, config.default_registry))
    parts.append(
        _block(
            t,
            t["containerd_all"],
            "/etc/containerd/certs.d/_default/hosts.toml",
            f'[host."https://{host}"]\n  capabilities = ["pull", "resolve"]\n' + t["containerd_ns"],
        )
    )
    parts.append(f"<p><small>mirrord {escape(__version__)}</small></p>")
    parts.append(f"<script>{COPY_SCRIPT}</script></body></html>\n")
    return "\n".join(parts).encode()
