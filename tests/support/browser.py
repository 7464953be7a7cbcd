"""Headless Chromium for end-to-end tests of the usage page, and the
README's screenshot (``python -m tests.support.browser``, see below).

Chromium runs with everything that could reach the network off (tests run
in a loopback-only namespace anyway, and every other host name resolves to
nothing), its own throwaway profile, and the page's console on stderr:
each console message (an error, a blocked script, a refused resource) is a
``CONSOLE`` line there. Every run is bounded by a timeout.
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

_CONSOLE = re.compile(r":CONSOLE[:(]")


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


FLAGS = [
    "--headless",
    "--no-sandbox",  # tests run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-breakpad",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
    "--metrics-recording-only",
    "--hide-scrollbars",
    "--mute-audio",
    # Only loopback exists: anything else fails at once instead of waiting.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    # The test CA is not in Chromium's store.
    "--ignore-certificate-errors",
    "--enable-logging=stderr",
    "--v=0",
]


@dataclass
class Visit:
    dom: str
    console: list[str]
    stderr: str


def visit(
    url: str,
    *extra: str,
    language: str = "en-US",
    timeout: float = 60,
) -> Visit:
    """Load ``url`` and return the DOM after its scripts ran, and the console."""
    binary = chromium_binary()
    assert binary, "chromium is not installed"
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                binary,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--lang={language}",
                f"--accept-lang={language}",
                *extra,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=profile,
        )
    console = [line for line in result.stderr.splitlines() if _CONSOLE.search(line)]
    return Visit(result.stdout, console, result.stderr)


def dump_dom(url: str, *extra: str, language: str = "en-US") -> Visit:
    return visit(url, "--dump-dom", *extra, language=language)


def screenshot(
    url: str, path: Path, width: int = 1000, height: int = 1400, language: str = "en-US"
) -> Visit:
    """A PNG of the page as Chromium renders it."""
    return visit(
        url, f"--screenshot={path.resolve()}", f"--window-size={width},{height}", language=language
    )


class HostRewriter:
    """A plain-HTTP proxy for Chromium that sends each request on to the
    mirror over TLS with a ``Host`` header of the test's choosing (a browser
    never sends a hostile one itself), and relays the answer unchanged."""

    def __init__(self, mirror_port: int, host: str) -> None:
        self.mirror_port = mirror_port
        self.host = host
        self.seen: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(30)
        self.port = self._listener.getsockname()[1]
        self._context = ssl.create_default_context()
        self._context.check_hostname = False
        self._context.verify_mode = ssl.CERT_NONE
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with client:
                client.settimeout(30)
                try:
                    self._relay(client)
                except OSError:
                    pass

    def _relay(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            data = client.recv(4096)
            if not data:
                return
            head += data
        lines = head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        method, target, _ = lines[0].split(b" ", 2)
        self.seen.append(target)
        path = b"/" + target.split(b"/", 3)[3] if target.startswith(b"http://") else target
        keep = [
            line
            for line in lines[1:]
            if line.split(b":", 1)[0].lower() in (b"accept", b"accept-language", b"user-agent")
        ]
        request = b"\r\n".join(
            [
                method + b" " + path + b" HTTP/1.1",
                b"Host: " + self.host.encode(),
                *keep,
                b"Connection: close",
                b"",
                b"",
            ]
        )
        raw = socket.create_connection(("127.0.0.1", self.mirror_port), timeout=30)
        with self._context.wrap_socket(raw) as upstream:
            upstream.sendall(request)
            while data := upstream.recv(65536):
                client.sendall(data)

    def close(self) -> None:
        self._stopped = True
        self._listener.close()
        self._thread.join(10)
