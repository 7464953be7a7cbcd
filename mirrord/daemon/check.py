"""``twistd mirrord --check-config``: validate the configuration the way a
start would, as ``nginx -t`` does, so that ``systemctl reload`` (whose
``ExecReload=`` runs it first) never hands the daemon a broken file.

It loads the file with the command line's overrides, parses every listen
entry into an endpoint (without binding it), loads the certificate and key
and the upstream CA bundle; then it prints the effective settings with
secrets redacted. Nothing is written: a self-signed certificate that does
not exist yet is reported, not made.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mirrord.config import Config, ConfigError
from mirrord.daemon.fleetwiring import check_fleet_files
from mirrord.daemon.tls import CertificateError, make_context, upstream_policy

REDACTED = "<redacted>"


def check(config: Config, parse_listen: Callable[[str], object]) -> str:
    """Everything a start checks before it binds; a line about the
    certificate in use. ``parse_listen`` turns a listen entry into an
    endpoint (``serverFromString``), raising ``ValueError`` on a bad one."""
    for entry in config.listen:
        try:
            parse_listen(entry)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise ConfigError(f"listen entry {entry!r} is not an endpoint: {e}") from None
    upstream_policy(config)
    check_fleet_files(config)
    if config.cert:
        cert, key = Path(config.cert), Path(config.key)
        make_context(cert, key, config.tls_min_version, config.tls_ciphers)
        return f"certificate {config.cert}"
    selfsigned = Path(config.state_dir) / "tls"
    cert, key = selfsigned / "selfsigned.crt", selfsigned / "selfsigned.key"
    if cert.is_file() and key.is_file():
        make_context(cert, key, config.tls_min_version, config.tls_ciphers)
        return f"self-signed certificate {cert}"
    _check_ciphers(config)
    return f"self-signed certificate {cert} (made at start)"


def _check_ciphers(config: Config) -> None:
    """Without certificate files yet, the cipher string is still checked
    (``make_context`` checks it before it looks for the files)."""
    try:
        make_context(Path("/"), Path("/"), config.tls_min_version, config.tls_ciphers)
    except CertificateError as e:
        if "no such file" not in str(e):
            raise


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(k)} = {_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _table(record: Any, skip: frozenset[str] = frozenset()) -> list[str]:
    return [
        f"{f.name} = {_value(getattr(record, f.name))}"
        for f in dataclasses.fields(record)
        if f.name not in skip
    ]


def effective_settings(config: Config) -> str:
    """The configuration as TOML, with every password hash redacted."""
    tables = frozenset({"timeouts", "cache", "access", "registries", "metrics", "store", "fleet"})
    lines = _table(config, tables)
    lines += ["", "[timeouts]", *_table(config.timeouts)]
    lines += ["", "[cache]", *_table(config.cache)]
    lines += ["", "[metrics]", *_table(config.metrics)]
    lines += ["", "[store]", *_table(config.store)]
    lines += ["", "[fleet]", *_table(config.fleet)]
    access = dataclasses.replace(
        config.access, users={name: REDACTED for name in config.access.users}
    )
    lines += ["", "[access]", *_table(access)]
    for name, registry in config.registries.items():
        lines += ["", f"[registries.{json.dumps(name)}]", *_table(registry, frozenset({"name"}))]
    return "\n".join(lines) + "\n"


def report(config: Config, source: str, parse_listen: Callable[[str], object]) -> str:
    """The settings and a last line saying the file is good, or raises
    ``ConfigError``/``CertificateError``/``OSError`` with the one-line reason."""
    certificate = check(config, parse_listen)
    return (
        f"# effective settings of {source}\n"
        + effective_settings(config)
        + f"# serving {certificate}\n"
        + f"mirrord: configuration {source} is ok\n"
    )
