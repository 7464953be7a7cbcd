"""The Debian package: packaging/build-deb builds it offline from the wheels
tests/run made; real dpkg installs, upgrades, removes and purges it in a
throwaway root (``--root`` with ``--force-script-chrootless``, so the
maintainer scripts run against that root through $DPKG_ROOT and the system
user is created in its /etc, not the host's); lintian reports no errors."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

import mirrord
from tests.support.processes import REPO, run

TOOLS = ("dpkg", "dpkg-deb", "dpkg-shlibdeps", "lintian", "useradd", "python3.11")
pytestmark = [
    pytest.mark.skipif(not all(shutil.which(t) for t in TOOLS), reason=f"needs {', '.join(TOOLS)}"),
    pytest.mark.skipif(os.geteuid() != 0, reason="dpkg --root needs root to set owners"),
]
WHEELS = REPO / ".wheels"  # made by tests/run, outside the network namespace
UPGRADE = f"{mirrord.__version__}+1"


@dataclass
class Built:
    first: Path
    second: Path
    build_dir: Path  # every build's TMPDIR: no path under it may reach the package
    lintian: subprocess.Popen


def _build(out: Path, build_dir: Path, version: str | None = None) -> Path:
    env = {
        "MIRRORD_WHEELS": str(WHEELS),
        "TMPDIR": str(build_dir),
        "DPKG_DEB_COMPRESSOR_TYPE": "gzip",  # xz takes a minute more
    }
    if version:
        env["MIRRORD_DEB_VERSION"] = version
    result = run(["bash", str(REPO / "packaging" / "build-deb"), "--out", str(out)], 600, env)
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Two builds of this checkout, the second with a higher version; lintian
    runs on the first while the second builds."""
    if not WHEELS.is_dir():
        pytest.skip("no .wheels: run tests/run, which makes them with the network")
    out = tmp_path_factory.mktemp("dist")
    build_dir = tmp_path_factory.mktemp("deb-build-marker")
    first = _build(out, build_dir)
    lintian = subprocess.Popen(
        ["lintian", "--tag-display-limit", "0", str(first)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    second = _build(out, build_dir, UPGRADE)
    return Built(first, second, build_dir, lintian)


def test_lintian_reports_no_errors(built: Built) -> None:
    """lintian finds no error (and no warning) in the package; overrides carry reasons."""
    output, _ = built.lintian.communicate(timeout=600)
    findings = [line for line in output.splitlines() if re.match(r"[EW]: ", line)]
    assert findings == [], output[-3000:]


def test_package_metadata_and_modes(built: Built) -> None:
    """The .deb is named after mirrord's version and architecture, depends on the interpreter its
    venv links to, declares the configuration a conffile and ships it readable by its group only."""
    arch = run(["dpkg", "--print-architecture"]).stdout.strip()
    assert built.first.name == f"mirrord_{mirrord.__version__}_{arch}.deb"
    fields = run(["dpkg-deb", "--field", str(built.first)]).stdout
    assert re.search(r"^Depends: python3\.11, adduser, passwd, libc6 \(>= ", fields, re.M)
    assert run(["dpkg-deb", "--ctrl-tarfile", str(built.first)], check=False).returncode == 0
    listing = run(["dpkg-deb", "--contents", str(built.first)]).stdout
    modes = {line.split()[-1]: line.split()[0] for line in listing.splitlines()}
    assert modes["./etc/mirrord/"] == "drwxr-x---"
    assert modes["./etc/mirrord/mirrord.toml"] == "-rw-r-----"
    assert modes["./lib/systemd/system/mirrord.service"] == "-rw-r--r--"
    assert modes["./opt/mirrord/bin/twistd"] == "-rwxr-xr-x"
    assert all("root/root" in line for line in listing.splitlines())
    assert not [name for name in modes if "__pycache__" in name or name.endswith(".pyc")]


class Root:
    """A throwaway root with an empty dpkg database and a minimal /etc."""

    def __init__(self, path: Path) -> None:
        self.path = path
        for directory in ("var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"):
            (path / directory).mkdir(parents=True)
        for name in ("var/lib/dpkg/status", "var/lib/dpkg/available"):
            (path / name).touch()
        (path / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
        (path / "etc/group").write_text("root:x:0:\n")
        (path / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
        (path / "etc/gshadow").write_text("root:*::\n")
        shutil.copy("/etc/login.defs", path / "etc/login.defs")

    def dpkg(self, *args: str) -> str:
        argv = ["dpkg", f"--root={self.path}", "--force-script-chrootless", "--force-depends"]
        return run([*argv, *args], timeout=300).stdout

    def query(self, fmt: str) -> str:
        admindir = f"--admindir={self.path / 'var/lib/dpkg'}"
        return run(["dpkg-query", admindir, "-W", "-f", fmt, "mirrord"], check=False).stdout

    def entry(self, database: str) -> list[str]:
        lines = (self.path / "etc" / database).read_text().splitlines()
        return [line for line in lines if line.startswith("mirrord:")]

    def __truediv__(self, relative: str) -> Path:
        return self.path / relative


def _mode_and_owner(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid


def test_install_upgrade_remove_purge(built: Built, tmp_path: Path) -> None:
    """dpkg installs the venv, unit, conffile, ufw profile and system user into a throwaway
    root; an upgrade keeps the edited configuration and the cache and rewrites the ufw profile
    for the new ports; remove keeps configuration and state; purge removes them."""
    host_passwd = Path("/etc/passwd").read_bytes()
    root = Root(tmp_path / "root")
    config = root / "etc/mirrord/mirrord.toml"
    profile = root / "etc/ufw/applications.d/mirrord"
    unit = root / "lib/systemd/system/mirrord.service"

    root.dpkg("--install", str(built.first))
    assert root.query("${Status} ${Version}") == f"install ok installed {mirrord.__version__}"
    assert root.query("${Conffiles}").split()[0] == "/etc/mirrord/mirrord.toml"
    [user] = root.entry("passwd")
    _, _, uid, gid, _, home, shell = user.split(":")
    assert (home, shell) == ("/var/lib/mirrord", "/usr/sbin/nologin")
    assert root.entry("group") == [f"mirrord:x:{gid}:"]
    uid_n, gid_n = int(uid), int(gid)
    assert _mode_and_owner(root / "etc/mirrord") == (0o750, 0, gid_n)
    assert _mode_and_owner(config) == (0o640, 0, gid_n)
    assert _mode_and_owner(root / "var/lib/mirrord") == (0o750, uid_n, gid_n)
    assert _mode_and_owner(root / "var/log/mirrord") == (0o750, uid_n, gid_n)
    assert config.read_text() == (REPO / "systemd/mirrord.toml").read_text()
    assert unit.read_text() == (REPO / "systemd/mirrord.service").read_text()
    assert "ports=443/tcp\n" in profile.read_text()
    assert Path("/etc/passwd").read_bytes() == host_passwd

    # The venv runs where it landed, with its own packages and no trace of the build.
    venv = root / "opt/mirrord"
    assert (venv / "bin/twistd").read_text().startswith("#!/opt/mirrord/bin/python\n")
    python = str(venv / "bin/python")
    where = run(
        [python, "-I", "-c", "import twisted, mirrord; print(mirrord.__file__, twisted.__file__)"]
    )
    assert all(p.startswith(f"{venv}/lib/python3.11/site-packages/") for p in where.stdout.split())
    twistd = [python, "-I", str(venv / "bin/twistd"), "mirrord"]
    state = str(tmp_path / "state")
    checked = run([*twistd, "--check-config", "--config", str(config), "--state-dir", state])
    assert "is ok" in checked.stdout
    assert list((venv / "lib/python3.11/site-packages/mirrord").glob("__pycache__/*.pyc"))
    marker = str(built.build_dir).encode()
    leaks = [p for p in root.path.rglob("*") if p.is_file() and marker in p.read_bytes()]
    assert leaks == []

    config.write_text("listen = [8443, 9443]\n")
    (root / "var/lib/mirrord/cache").mkdir()
    (root / "var/lib/mirrord/cache/blob").write_text("cached")
    root.dpkg("--install", str(built.second))
    assert root.query("${Status} ${Version}") == f"install ok installed {UPGRADE}"
    assert config.read_text() == "listen = [8443, 9443]\n"
    assert _mode_and_owner(config) == (0o640, 0, gid_n)
    assert not list((root / "etc/mirrord").glob("*.dpkg-*"))
    assert "ports=8443/tcp|9443/tcp\n" in profile.read_text()
    assert (root / "var/lib/mirrord/cache/blob").read_text() == "cached"
    assert root.entry("passwd") == [user]

    root.dpkg("--remove", "mirrord")
    assert root.query("${Status}") == "deinstall ok config-files"
    assert not (root / "opt/mirrord").exists()
    assert not unit.exists()
    assert config.read_text() == "listen = [8443, 9443]\n"
    assert (root / "var/lib/mirrord/cache/blob").exists()

    root.dpkg("--purge", "mirrord")
    assert root.query("${Status}") in ("", "unknown ok not-installed")
    for gone in (
        "etc/mirrord",
        "var/lib/mirrord",
        "var/log/mirrord",
        "etc/ufw/applications.d/mirrord",
    ):
        assert not (root / gone).exists(), gone
    # The system user stays (packaging/postrm says why).
    assert root.entry("passwd") == [user]
