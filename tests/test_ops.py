"""Small operational pieces: sd_notify, log lines, the ufw profile."""

from __future__ import annotations

import io
import json
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from unittest.mock import patch

from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mirrord import config
from mirrord.daemon import logs, ufw
from mirrord.daemon.role import Role
from mirrord.daemon.systemd import notify
from mirrord.expiring import Expiring
from mirrord.front import accesslog
from mirrord.registry.respond import plain_address


class NotifyTests(SynchronousTestCase):
    def test_notify_sends_one_datagram(self) -> None:
        """READY=1 reaches the socket named by NOTIFY_SOCKET."""
        path = Path(tempfile.mkdtemp()) / "notify"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
            server.bind(str(path))
            self.assertTrue(notify("READY=1", {"NOTIFY_SOCKET": str(path)}))
            self.assertEqual(server.recv(100), b"READY=1")

    def test_without_systemd_nothing_happens(self) -> None:
        self.assertFalse(notify("READY=1", {}))
        self.assertFalse(notify("READY=1", {"NOTIFY_SOCKET": "relative"}))


class _NotATerminal(io.StringIO):
    def isatty(self) -> bool:
        return False


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class LogTests(SynchronousTestCase):
    def emit(self, stream: io.StringIO, role: Role | None = None) -> str:
        publisher = LogPublisher(logs.observer(stream, role or Role()))
        Logger(namespace="mirrord.access", observer=publisher).info(
            "{client} GET {path} -> {status}", client="10.0.0.1", path="/v2/", status=200
        )
        return stream.getvalue()

    def test_json_lines_off_a_terminal(self) -> None:
        """Off a terminal each event is one JSON object with its fields."""
        record = json.loads(self.emit(_NotATerminal()))
        self.assertEqual(record["message"], "10.0.0.1 GET /v2/ -> 200")
        self.assertEqual((record["client"], record["status"]), ("10.0.0.1", 200))
        self.assertEqual((record["level"], record["namespace"]), ("info", "mirrord.access"))

    def test_access_event_json_line(self) -> None:
        """The access event's JSON line has its rendered text as the message,
        once, next to every field."""
        stream = _NotATerminal()
        with patch.object(accesslog.log, "observer", LogPublisher(logs.observer(stream))):
            accesslog.emit(
                client="10.0.0.1",
                method="GET",
                path="/v2/{x}/",
                status=200,
                sent=5,
                duration=0.002,
                record=accesslog.AccessRecord(started=0.0, cache="HIT"),
            )
        record = json.loads(stream.getvalue())
        self.assertEqual(
            record["message"],
            "10.0.0.1 GET /v2/{x}/ -> 200 bytes=5 2.0ms upstream=- redirects=0"
            " fallback=False cache=HIT ok",
        )
        self.assertEqual((record["path"], record["cache"], record["bytes"]), ("/v2/{x}/", "HIT", 5))
        self.assertEqual(stream.getvalue().count("10.0.0.1 GET"), 1)

    def test_json_lines_written_in_batches_of_whole_lines(self) -> None:
        """Lines logged in one reactor turn reach the output in one write,
        and no write is over 4 KiB or ends inside a line."""
        writes: list[str] = []
        turns: list[Callable[[], None]] = []

        class Recording(_NotATerminal):
            def write(self, text: str) -> int:
                writes.append(text)
                return len(text)

        stream = Recording()
        lines = logs.BatchedLines(stream, lambda call: turns.append(call) or True, lambda: True)
        log = Logger(observer=logs.json_lines_observer(stream, lines=lines))
        for i in range(3):
            log.info("request {i}", i=i)
        self.assertEqual(writes, [])
        turns.pop()()
        self.assertEqual(len(writes), 1)
        self.assertEqual(
            [json.loads(line)["message"] for line in writes[0].splitlines()],
            ["request 0", "request 1", "request 2"],
        )
        writes.clear()
        for i in range(100):
            log.info("{path}", path=f"/v2/{i}/" + "x" * 200)
        for call in turns:
            call()
        self.assertGreater(len(writes), 1)
        self.assertTrue(all(len(w) <= 4096 and w.endswith("\n") for w in writes))
        paths = [json.loads(line)["path"] for w in writes for line in w.splitlines()]
        self.assertEqual(paths, [f"/v2/{i}/" + "x" * 200 for i in range(100)])

    def test_text_on_a_terminal(self) -> None:
        line = self.emit(_Terminal())
        self.assertIn("[mirrord.access#info] 10.0.0.1 GET /v2/ -> 200", line)

    def test_a_workers_events_say_which_worker(self) -> None:
        """In worker 2 of 2 each event carries worker=2, in JSON and on a terminal;
        the one process's events carry no worker."""
        role = Role(2, 2, Path("/state/workers"))
        record = json.loads(self.emit(_NotATerminal(), role))
        self.assertEqual((record["worker"], record["status"]), (2, 200))
        self.assertIn(
            "[mirrord.access#info worker=2] 10.0.0.1 GET /v2/ -> 200", self.emit(_Terminal(), role)
        )
        self.assertNotIn("worker", json.loads(self.emit(_NotATerminal())))


class UfwTests(SynchronousTestCase):
    def test_profile_lists_listen_ports(self) -> None:
        """Bare ports and tcp endpoints become the profile's ports; unix sockets do not."""
        parsed = config.from_mapping(
            {"listen": [443, "tcp6:8443:interface=\\:\\:", "unix:/run/m.sock", "ssl:9443"]}
        )
        self.assertEqual(ufw.listen_ports(parsed), [443, 8443, 9443])
        self.assertIn("ports=443/tcp|8443/tcp|9443/tcp\n", ufw.profile(parsed))

    def test_http01_port_opened_only_for_http01(self) -> None:
        """ACME's HTTP-01 listener is in the profile when, and only when, it is used."""
        http01 = config.from_mapping(
            {"acme_domains": ["m.example"], "acme_challenge": "http-01", "acme_http_listen": 80}
        )
        self.assertEqual(ufw.listen_ports(http01), [80, 443])
        alpn = config.from_mapping({"acme_domains": ["m.example"]})
        self.assertEqual(ufw.listen_ports(alpn), [443])


class AddressTests(SynchronousTestCase):
    def test_ipv4_clients_on_the_dual_stack_socket_read_as_ipv4(self) -> None:
        self.assertEqual(plain_address("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(plain_address("2001:db8::1"), "2001:db8::1")
        self.assertEqual(plain_address("::ffff:abcd"), "::ffff:abcd")


class ExpiringTests(SynchronousTestCase):
    def test_entries_expire_and_the_map_stays_bounded(self) -> None:
        """Remembered answers expire, and many short-lived keys never grow the map past its cap."""
        now = [0.0]
        seen: Expiring[str, bool] = Expiring(lambda: now[0], max_entries=100)
        seen.put("a", True, 10)
        self.assertTrue(seen.get("a"))
        now[0] = 11
        self.assertIsNone(seen.get("a"))
        for i in range(1000):
            seen.put(f"token-{i}", True, 300)
        self.assertLessEqual(len(seen), 100)
        self.assertTrue(seen.get("token-999"))
