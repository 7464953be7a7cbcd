"""A one-node Ceph RADOS Gateway (real S3) for tests: ceph-mon, one
memstore ceph-osd and radosgw (beast) on loopback, every file they write
(config, mon and osd data, logs, admin sockets, pid files) under one
directory, no systemd and no root-owned paths.

Real S3 because a mock (moto) checks neither signatures nor conditions;
RGW does both, and ``If-None-Match: *`` is atomic there. Starting takes
seconds, so a session starts it once. Every step waits with a bound and a
failed start stops whatever did start and says why, with the logs' tails.
Stop order matters: rgw, then osd, then mon (an RGW whose mon is gone
ignores SIGTERM).
"""

from __future__ import annotations

import ctypes
import http.client
import os
import signal
import ssl
import subprocess
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.support.processes import free_port

START_TIMEOUT = 60.0  # the whole start; each step also has its own bound
STOP_TIMEOUT = 10.0  # per daemon, after SIGTERM, before SIGKILL
ACCESS_KEY = "MIRRORDTESTACCESSKEY"
SECRET_KEY = "mirrord-test-secret-key-0123456789abcdef"
# RGW's default zonegroup is named "default", but with SigV4 it accepts
# any region in the credential scope (both "default" and "us-east-1" are
# answered 200, checked in tests/test_rgw_fixture.py); "us-east-1" is what
# S3 clients assume, so it is what tests sign with.
REGION = "us-east-1"


class RgwError(RuntimeError):
    """RGW did not come up (the message carries the logs' tails)."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Rgw:
    """A running one-node RGW; ``start`` it, ``stop`` it (always)."""

    directory: Path
    endpoint: str = ""
    tls_endpoint: str | None = None
    ca: Path | None = None
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    start_seconds: float = 0.0
    conf: Path | None = None
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _logs: list = field(default_factory=list)

    # -- lifecycle -------------------------------------------------------

    @classmethod
    def start(
        cls,
        directory: Path,
        tls: tuple[Path, Path] | None = None,
        ca: Path | None = None,
        timeout: float = START_TIMEOUT,
    ) -> Rgw:
        """Bring up mon, osd and rgw under ``directory`` and create the S3
        user; ``tls`` is a (certificate chain, private key) pair for an
        extra HTTPS endpoint, ``ca`` the root that clients should trust."""
        rgw = cls(directory=directory, ca=ca if tls else None)
        began = time.monotonic()
        try:
            rgw._start(tls, began + timeout)
        except BaseException as e:
            rgw.stop()
            if isinstance(e, RgwError):
                raise
            raise RgwError(f"RGW start failed: {e!r}\n{rgw.log_tails()}") from e
        rgw.start_seconds = time.monotonic() - began
        return rgw

    def _start(self, tls: tuple[Path, Path] | None, deadline: float) -> None:
        d = self.directory
        for sub in ("run", "log", "mon", "osd", "rgw"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        mon_port, port = free_port(), free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        frontend = f"beast endpoint=127.0.0.1:{port}"
        if tls:
            tls_port = free_port()
            self.tls_endpoint = f"https://127.0.0.1:{tls_port}"
            frontend += (
                f" ssl_endpoint=127.0.0.1:{tls_port}"
                f" ssl_certificate={tls[0]} ssl_private_key={tls[1]}"
            )
        self.conf = d / "ceph.conf"
        self.conf.write_text(_config(d, mon_port, frontend))
        keyring = d / "keyring"
        fsid = str(uuid.uuid4())

        self._run(
            "ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "mon.",
            "--cap", "mon", "allow *", deadline=deadline, conf=False,
        )  # fmt: skip
        self._run(
            "monmaptool", "--create", "--addv", "a", f"[v2:127.0.0.1:{mon_port}]",
            "--fsid", fsid, d / "monmap", deadline=deadline, conf=False,
        )  # fmt: skip
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", d / "monmap", deadline=deadline)
        self._daemon("mon", "ceph-mon", "-i", "a")
        osd_uuid = str(uuid.uuid4())
        # The first command also waits for the mon to answer.
        osd_id = self._run("ceph", "osd", "new", osd_uuid, deadline=deadline, retry=True).strip()
        (d / "osd" / osd_id).mkdir()
        self._run("ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid, deadline=deadline)
        self._daemon("osd", "ceph-osd", "-i", osd_id)
        self._daemon("rgw", "radosgw", "-n", "client.rgw.a")
        self._wait_http(deadline)
        self._run(
            "radosgw-admin", "user", "create", "--uid=test", "--display-name=test",
            f"--access-key={self.access_key}", f"--secret={self.secret_key}",
            deadline=deadline,
        )  # fmt: skip

    def stop(self) -> None:
        """Stop rgw, then osd, then mon, each SIGTERM then SIGKILL after a
        bound; thaws a frozen OSD first (a stopped process ignores TERM)."""
        for name in ("rgw", "osd", "mon"):
            proc = self._procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            try:
                os.kill(proc.pid, signal.SIGCONT)
                proc.terminate()
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
            except ProcessLookupError:
                pass
        for log in self._logs:
            log.close()
        self._logs.clear()

    def freeze_osd(self, timeout: float = 5.0) -> None:
        """SIGSTOP the OSD: RGW then hangs (it does not fail) on every call
        that needs data, as it does when storage stalls. Returns once every
        thread of it has stopped: SIGSTOP takes effect thread by thread, and
        a request reaching the OSD before that is answered."""
        pid = self.pids["osd"]
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while True:
            states = [
                (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
                for task in Path(f"/proc/{pid}/task").iterdir()
            ]
            if all(state == "T" for state in states):
                return
            if time.monotonic() > deadline:
                raise RgwError(f"the OSD did not stop: {''.join(states)}")
            time.sleep(0.01)

    def thaw_osd(self) -> None:
        os.kill(self.pids["osd"], signal.SIGCONT)

    @property
    def pids(self) -> dict[str, int]:
        """The PIDs of "mon", "osd" and "rgw"."""
        return {name: proc.pid for name, proc in self._procs.items()}

    def rss_kib(self) -> dict[str, int]:
        """Each daemon's resident set size now (VmRSS, KiB)."""
        found = {}
        for name, pid in self.pids.items():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    found[name] = int(line.split()[1])
        return found

    def log_tails(self, lines: int = 15) -> str:
        parts = []
        for path in sorted((self.directory / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    # -- S3 --------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        *,
        timeout: float = 10.0,
        tls: bool = False,
        region: str | None = None,
    ) -> Response:
        """One SigV4-signed request; ``path`` is "/bucket/key?query" with
        the key unquoted (it is quoted here)."""
        base = self.tls_endpoint if tls else self.endpoint
        if base is None:
            raise RgwError("TLS is not configured")
        raw_path, _, query = path.partition("?")
        url = base + urllib.parse.quote(raw_path) + (f"?{query}" if query else "")
        request = AWSRequest(method=method, url=url, data=body, headers=dict(headers or {}))
        S3SigV4Auth(
            Credentials(self.access_key, self.secret_key), "s3", region or self.region
        ).add_auth(request)
        parts = urllib.parse.urlsplit(url)
        if tls:
            context = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
            conn = http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=timeout, context=context
            )
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        try:
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            conn.request(method, target, body=body, headers=dict(request.headers.items()))
            response = conn.getresponse()
            return Response(response.status, dict(response.getheaders()), response.read())
        finally:
            conn.close()

    def bucket(self, name: str | None = None) -> str:
        """Create a fresh bucket (a unique name unless given) and return its name."""
        name = name or f"t-{uuid.uuid4().hex[:20]}"
        response = self.request("PUT", f"/{name}")
        if response.status != 200:
            raise RgwError(f"creating bucket {name}: {response.status} {response.body!r}")
        return name

    # -- steps -----------------------------------------------------------

    def _argv(self, program: str, args, conf: bool) -> list[str]:
        return [program, *(["-c", str(self.conf)] if conf else []), *map(str, args)]

    def _run(
        self, program: str, *args, deadline: float, conf: bool = True, retry: bool = False
    ) -> str:
        """Run one command to completion within the start's deadline;
        ``retry`` repeats it (the mon may not answer yet) until then."""
        argv = self._argv(program, args, conf)
        if conf and program == "ceph":
            argv[1:1] = ["--connect-timeout", "5"]
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RgwError(f"no time left for {argv}\n{self.log_tails()}")
            self._check_daemons()
            try:
                result = subprocess.run(
                    argv, capture_output=True, text=True, timeout=min(left, 20), cwd=self.directory
                )
            except subprocess.TimeoutExpired:
                if retry:
                    continue
                raise RgwError(f"{argv} timed out\n{self.log_tails()}") from None
            if result.returncode == 0:
                return result.stdout
            if not retry:
                raise RgwError(
                    f"{argv} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n"
                    f"{self.log_tails()}"
                )
            time.sleep(0.2)

    def _daemon(self, name: str, program: str, *args) -> None:
        log = (self.directory / "log" / f"{name}.out").open("ab")
        self._logs.append(log)
        self._procs[name] = subprocess.Popen(
            [*self._argv(program, args, True), "-f"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.directory,
            preexec_fn=_die_with_parent,
        )

    def _check_daemons(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise RgwError(f"{name} exited {proc.returncode}\n{self.log_tails()}")

    def _wait_http(self, deadline: float) -> None:
        """Until beast answers an anonymous GET / (RGW creates its pools
        before it listens)."""
        parts = urllib.parse.urlsplit(self.endpoint)
        while time.monotonic() < deadline:
            self._check_daemons()
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=2)
            try:
                conn.request("GET", "/")
                conn.getresponse().read()
                return
            except OSError:
                time.sleep(0.1)
            finally:
                conn.close()
        raise RgwError(f"radosgw did not answer on {self.endpoint}\n{self.log_tails()}")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies, so a
    killed pytest leaves no Ceph daemon behind (stop() is the normal way)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _config(d: Path, mon_port: int, frontend: str) -> str:
    settings = {
        "mon host": f"v2:127.0.0.1:{mon_port}",
        "mon initial members": "a",
        "public addr": "127.0.0.1",
        "public network": "127.0.0.0/8",
        "cluster addr": "127.0.0.1",
        "ms bind msgr1": "false",
        "auth cluster required": "none",
        "auth service required": "none",
        "auth client required": "none",
        # Without these RGW loops on "get_initial_auth_request returned -13".
        "ms mon client mode": "crc secure",
        "ms client mode": "crc secure",
        "ms mon service mode": "crc secure",
        "ms mon cluster mode": "crc secure",
        "osd pool default size": "1",
        "osd pool default min size": "1",
        "mon allow pool size one": "true",
        "osd crush chooseleaf type": "0",
        "osd pool default pg num": "8",
        "osd pool default pgp num": "8",
        "osd pool default pg autoscale mode": "off",
        "mon max pg per osd": "1000",
        # RGW creates its pools one by one, each a new osdmap; the mon's
        # default of proposing at most once a second made that most of
        # the start.
        "paxos propose interval": "0.05",
        "mon warn on pool no redundancy": "false",
        "osd objectstore": "memstore",
        "memstore device bytes": str(2 << 30),
        "run dir": str(d / "run"),
        "admin socket": str(d / "run" / "$name.$pid.asok"),
        "pid file": str(d / "run" / "$name.pid"),
        "log file": str(d / "log" / "$name.log"),
        "mon cluster log file": str(d / "log" / "$cluster.$channel.log"),
        "crash dir": str(d / "crash"),
        "keyring": str(d / "keyring"),
        "mon data": str(d / "mon" / "$id"),
        "osd data": str(d / "osd" / "$id"),
        "rgw data": str(d / "rgw"),
    }
    lines = ["[global]"]
    lines += [f"{key} = {value}" for key, value in settings.items() if value is not None]
    lines += ["[client.rgw.a]", f"rgw frontends = {frontend}", "rgw thread pool size = 64"]
    return "\n".join(lines) + "\n"
