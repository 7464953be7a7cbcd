"""The ufw application profile for the configured listeners, so that
``ufw allow mirrord`` opens exactly those ports.

``python -m mirrord.daemon.ufw [CONFIG]`` prints it; ``systemd/install`` writes it
to ``/etc/ufw/applications.d/mirrord``."""

from __future__ import annotations

import sys
from pathlib import Path

from mirrord import config as configuration


def listen_ports(config: configuration.Config) -> list[int]:
    """TCP ports of the listeners (bare ports and tcp/tcp6/ssl endpoints),
    with ACME's HTTP-01 port when that challenge is chosen."""
    ports = []
    entries = list(config.listen)
    if config.acme_domains and config.acme_challenge == "http-01":
        entries.append(config.acme_http_listen)
    for entry in entries:
        if entry.isdigit():
            ports.append(int(entry))
            continue
        kind, _, rest = entry.partition(":")
        port = rest.split(":", 1)[0]
        if kind in ("tcp", "tcp6", "ssl") and port.isdigit():
            ports.append(int(port))
    return sorted(set(ports))


def profile(config: configuration.Config) -> str:
    ports = "|".join(f"{port}/tcp" for port in listen_ports(config))
    return (
        "[mirrord]\n"
        "title=mirrord registry mirror\n"
        "description=TLS pull-through mirror for container registries\n"
        f"ports={ports}\n"
    )


def main(argv: list[str]) -> None:
    path = Path(argv[0]) if argv else None
    try:
        sys.stdout.write(profile(configuration.load(path)))
    except configuration.ConfigError as e:
        raise SystemExit(f"mirrord: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
