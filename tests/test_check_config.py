"""``twistd mirrord --check-config``, run as the installed twistd, and the
unit's ``ExecReload=`` that runs it before the SIGHUP."""

from __future__ import annotations

import re
import shlex
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrord.passwords import make_hash
from tests.support.pki import Pki, make_pki
from tests.support.processes import REPO, run, twistd

UNIT = REPO / "systemd" / "mirrord.service"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("check-pki"))


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something else already listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _good(tmp_path: Path, pki: Pki, port: int) -> tuple[Path, str]:
    secret = make_hash("correct horse", salt=b"0123456789abcdef")
    config = tmp_path / "mirrord.toml"
    config.write_text(
        f'listen = ["tcp:{port}:interface=127.0.0.1", 8443]\n'
        f'cert = "{pki.fullchain}"\nkey = "{pki.privkey}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        '[cache]\nmax_size = "2GiB"\n'
        f'[access.users]\nalice = "{secret}"\n'
        '[registries."ghcr.io"]\n'
    )
    return config, secret


def _check(config: Path, *extra: str) -> tuple[int, str, str]:
    result = run(
        [twistd(), "mirrord", "--check-config", "--config", str(config), *extra], check=False
    )
    return result.returncode, result.stdout, result.stderr


def test_good_file_prints_effective_settings(tmp_path: Path, pki: Pki, busy_port: int) -> None:
    """A good file exits 0 and prints the effective settings with password hashes redacted,
    without binding the ports (one of them is busy) or writing the state directory."""
    config, secret = _good(tmp_path, pki, busy_port)
    code, out, err = _check(config)
    assert code == 0, err
    assert f'listen = ["tcp:{busy_port}:interface=127.0.0.1", "8443"]' in out
    assert f'cert = "{pki.fullchain}"' in out
    assert f"max_size = {2 << 30}" in out
    assert 'users = {"alice" = "<redacted>"}' in out
    assert '[registries."ghcr.io"]\nupstreams = ["https://ghcr.io"]' in out
    assert '[store]\nbackend = "disk"' in out and '[fleet]\nredis = ""' in out
    assert secret not in out + err
    assert out.endswith(f"mirrord: configuration {config} is ok\n")
    assert not (tmp_path / "state").exists()


def test_command_line_overrides_are_checked(tmp_path: Path, pki: Pki, busy_port: int) -> None:
    """The options a start would take are applied before the check, as the daemon applies them."""
    config, _ = _good(tmp_path, pki, busy_port)
    code, out, err = _check(
        config, "--listen", "9443", "--upstream", "http://127.0.0.1:9", "--workers", "3"
    )
    assert code == 0, err
    assert 'listen = ["9443"]' in out
    assert "\nworkers = 3\n" in out
    code, out, err = _check(config, "--key", str(tmp_path / "missing.pem"))
    assert (code, out) == (1, "")
    assert err == f"mirrord: {tmp_path / 'missing.pem'}: no such file\n"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("listen = [\n", "not valid TOML"),
        ('listen = ["tcp:notaport"]\n', "listen entry 'tcp:notaport' is not an endpoint"),
        ('listen = ["bogus:443"]\n', "listen entry 'bogus:443' is not an endpoint"),
        ('cert = "{dir}/nope.pem"\nkey = "{key}"\n', "{dir}/nope.pem: no such file"),
        ('cert = "{bad}"\nkey = "{key}"\n', "{bad}: not a PEM certificate chain"),
        ('tls_ciphers = "NOTACIPHER"\n', "selects no usable cipher"),
        ('upstream_ca = "{bad}"\n', "{bad}: holds no certificate"),
        ('[cache]\nmax_size = "lots"\n', "max_size"),
        (
            '[store]\nbackend = "s3"\nendpoint = "http://127.0.0.1:9"\nbucket = "b"\n'
            'access_key = "k"\nsecret_key_file = "{dir}/none"\n',
            "[store] secret_key_file {dir}/none: cannot read",
        ),
        (
            '[fleet]\nredis = "redis://127.0.0.1:9/0"\nadvertise = "https://127.0.0.1:8443"\n'
            'secret_file = "{dir}/short"\n',
            "[fleet] secret_file {dir}/short: ",
        ),
        (
            '[fleet]\nredis = "redis://127.0.0.1:9/0"\nadvertise = "https://127.0.0.1:8443"\n'
            'secret_file = "{dir}/secret"\ntls_ca = "{bad}"\n',
            "[fleet] tls_ca {bad}: no usable CA certificate",
        ),
        (
            '[store]\nbackend = "s3"\nendpoint = "https://127.0.0.1:9"\nbucket = "b"\n'
            'access_key = "k"\nsecret_key_file = "{dir}/secret"\ntls_ca = "{dir}/none"\n',
            "[store] tls_ca {dir}/none: cannot read",
        ),
    ],
)
def test_broken_file_exits_1_with_one_line(tmp_path: Path, pki: Pki, text: str, error: str) -> None:
    """A broken file exits 1 with one line on stderr naming the problem, and nothing on stdout."""
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    (tmp_path / "short").write_text("too short\n")
    (tmp_path / "secret").write_text("a secret long enough for the fleet\n")
    fill = {"dir": str(tmp_path), "key": str(pki.privkey), "bad": str(bad)}
    config = tmp_path / "mirrord.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n' + text.format(**fill))
    code, out, err = _check(config)
    assert (code, out) == (1, "")
    assert err.startswith("mirrord: ") and err.count("\n") == 1, err
    assert error.format(**fill) in err


def _reloads() -> list[list[str]]:
    return [shlex.split(v) for v in re.findall(r"^ExecReload=(.*)$", UNIT.read_text(), re.M)]


def test_unit_reload_checks_before_sighup(tmp_path: Path, pki: Pki, busy_port: int) -> None:
    """The unit's ExecReload runs the check on the daemon's own file first, and only then sends
    SIGHUP; the check fails on a broken file, so systemd never sends the signal."""
    start = shlex.split(re.search(r"^ExecStart=(.*)$", UNIT.read_text(), re.M).group(1))
    check, hup = _reloads()
    assert hup == ["/bin/kill", "-HUP", "$MAINPID"]
    assert check[0] == start[0] and "--check-config" in check
    # The same file and options as the daemon, minus twistd's own.
    assert check[check.index("mirrord") :] == [
        *start[start.index("mirrord") :][:1],
        "--check-config",
        *start[start.index("mirrord") + 1 :],
    ]
    config, _ = _good(tmp_path, pki, busy_port)
    argv = [twistd(), *check[1:-1], str(config)]
    assert run(argv, check=False).returncode == 0
    config.write_text('listen = ["tcp:notaport"]\n')
    result = run(argv, check=False)
    assert result.returncode == 1
    assert "not an endpoint" in result.stderr
