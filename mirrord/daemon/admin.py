"""The admin socket: ``state_dir/admin.sock`` (mode 0600, so only the
service user and root reach it), where ``mirrord-admin`` inspects and
prunes the cache of a running daemon.

One JSON request per line, answered by zero or more ``{"progress": [done,
total]}`` lines and one ``{"ok": ...}`` line. The work is
``mirrord.store.inventory``'s: a snapshot of the index is taken on the
reactor, planning (which reads manifests) and file removal run on the disk
worker, and the index changes on the reactor, where a blob a client is
reading stays (``Entry.readers``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin

from mirrord.store import inventory
from mirrord.store.disk import BlobStore

T = TypeVar("T")
log = Logger()
SOCKET_NAME = "admin.sock"
IDLE_TIMEOUT = 60.0
REPLANS = 3
Runner = Callable[..., Deferred]


class AdminProtocol(LineReceiver, TimeoutMixin):
    delimiter = b"\n"
    MAX_LENGTH = 64 << 10

    def __init__(self, admin: Admin) -> None:
        self.admin = admin
        self.busy = False

    def connectionMade(self) -> None:
        self.callLater = self.admin.reactor.callLater
        self.setTimeout(IDLE_TIMEOUT)

    def connectionLost(self, reason: object = None) -> None:
        self.setTimeout(None)

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout()
        if self.busy:
            self._send({"ok": False, "error": "one request at a time"})
            return
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
        except ValueError as e:
            self._send({"ok": False, "error": f"bad request: {e}"})
            return
        self.busy = True
        self.setTimeout(None)  # a long delete sends progress; the client bounds its wait
        d = self.admin.handle(request, lambda done, total: self._send({"progress": [done, total]}))
        d.addCallbacks(
            lambda result: self._send({"ok": True, "result": result}),
            lambda f: self._send({"ok": False, "error": _message(f)}),
        )
        d.addBoth(self._idle)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._send({"ok": False, "error": "request too long"})
        self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        self.transport.abortConnection()

    def _idle(self, _: object) -> None:
        self.busy = False
        self.setTimeout(IDLE_TIMEOUT)

    def _send(self, message: dict) -> None:
        if self.transport is not None and self.connected:
            self.sendLine(json.dumps(message).encode())


def _message(failure: Any) -> str:
    if failure.check(LookupError, ValueError, KeyError):
        return str(failure.value.args[0] if failure.value.args else failure.value)
    log.failure("admin request failed", failure)
    return f"internal error: {failure.getErrorMessage()}"


class Admin:
    """The operations the socket offers, on the live store."""

    def __init__(
        self, reactor: Any, store: BlobStore, run: Runner, configured_pins: tuple[str, ...]
    ) -> None:
        self.reactor = reactor
        self.store = store
        self.run = run
        self.configured_pins = configured_pins

    def handle(self, request: dict, progress: Callable[[int, int], None]) -> Deferred:
        op = request.get("op")
        if op == "list":
            return self.run(inventory.listing, inventory.View.of(self.store))
        if op == "show":
            target = inventory.Target.parse(str(request.get("target", "")))
            return self.run(inventory.show, inventory.View.of(self.store), target)
        if op == "delete":
            target = inventory.Target.parse(str(request.get("target", "")))
            return self._delete(target, bool(request.get("dry_run")), progress)
        if op in ("pin", "unpin", "pins"):
            return self._pins(op, str(request.get("pattern", "")))
        return _failed(ValueError(f"unknown operation {op!r}"))

    @inlineCallbacks
    def _delete(self, target: inventory.Target, dry_run: bool, progress: Callable) -> Any:
        for _ in range(REPLANS):
            view, version = inventory.View.of(self.store), self.store.tags.version
            plan = yield self.run(inventory.plan_delete, view, target)
            # Planning ran on the disk worker while pulls went on: a tag
            # moved or a manifest arrived since may reference what the
            # plan removes. Then plan again, from a fresh snapshot.
            if self.store.tags.version == version and not any(
                inventory.is_manifest(self.store.entries[d])
                for d in self.store.entries.keys() - view.entries.keys()
            ):
                break
        else:
            raise ValueError("the cache changed during each try; try again")
        result = plan.describe()
        if dry_run:
            return result
        tag_files, removed, busy = inventory.apply_index(self.store, plan)

        def report(done: int, total: int) -> None:
            self.reactor.callFromThread(progress, done, total)

        yield self.run(inventory.remove_files, self.store, tag_files, removed, report)
        log.info(
            "admin deleted {target}: {tags} tags, {blobs} blobs, {bytes} bytes; {busy} in use kept",
            target=str(target),
            tags=len(tag_files),
            blobs=len(removed),
            bytes=sum(plan.blobs[d] for d in removed),
            busy=len(busy),
        )
        result["busy"] = busy
        return result

    @inlineCallbacks
    def _pins(self, op: str, pattern: str) -> Any:
        pins = set(inventory.read_pins(self.store.root))
        if op != "pins":
            if not pattern:
                raise ValueError("a pattern is needed")
            (pins.add if op == "pin" else pins.discard)(pattern)
            yield self.run(inventory.write_pins, self.store.root, pins)
            self.store.set_pins(self.configured_pins + tuple(sorted(pins)))
        return {"admin": sorted(pins), "configured": list(self.configured_pins)}


def _failed(error: Exception) -> Deferred:
    d: Deferred = Deferred()
    d.errback(error)
    return d


def admin_service(
    reactor: Any, state_dir: Path, store: BlobStore, run: Runner, configured_pins: tuple[str, ...]
) -> StreamServerEndpointService:
    """The socket's listener, started with the daemon. ``wantPID`` takes a
    lock beside the socket, so a stale socket left by a crash is replaced
    and a second daemon on the same state directory fails to start it."""
    admin = Admin(reactor, store, run, configured_pins)
    endpoint = UNIXServerEndpoint(reactor, str(state_dir / SOCKET_NAME), mode=0o600, wantPID=True)
    service = StreamServerEndpointService(
        endpoint, Factory.forProtocol(lambda: AdminProtocol(admin))
    )
    service.setName("admin socket")
    return service
