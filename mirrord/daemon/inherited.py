"""What a worker gets from its supervisor besides its ``Role``: the
listening sockets the parent bound (as inherited file descriptors), a pipe
back to the parent, and the parent's pid, all named in the environment.

The sockets are adopted, not bound again: every worker accepts from the
same kernel queue, so a worker that dies loses only its own connections,
and a port below 1024 needs no privilege in the workers.

The pipe carries sd_notify's words (``READY=1``, ``RELOADING=1``,
``STOPPING=1``, and ``RENEWED=1`` when worker 1 renewed the ACME
certificate), one per line: the parent, not the worker, talks to systemd.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()

LISTEN = "MIRRORD_LISTEN_FDS"
HTTP01 = "MIRRORD_HTTP01_FD"
CONTROL = "MIRRORD_CONTROL_FD"
PARENT = "MIRRORD_PARENT_PID"
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Socket:
    """A bound, listening socket as the child sees it."""

    fd: int
    family: int
    entry: str  # the listen entry it was bound for, for the logs

    def as_json(self) -> list[Any]:
        return [self.fd, self.family, self.entry]


@dataclass(frozen=True)
class Inherited:
    listeners: tuple[Socket, ...]
    control_fd: int
    parent_pid: int
    http01: Socket | None = None

    def environ(self) -> dict[str, str]:
        """What the supervisor puts in a child's environment."""
        env = {
            LISTEN: json.dumps([s.as_json() for s in self.listeners]),
            CONTROL: str(self.control_fd),
            PARENT: str(self.parent_pid),
        }
        if self.http01 is not None:
            env[HTTP01] = json.dumps(self.http01.as_json())
        return env

    @classmethod
    def present(cls, environ: Mapping[str, str] | None = None) -> bool:
        """Whether a supervisor handed sockets down to this process."""
        return LISTEN in (os.environ if environ is None else environ)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Inherited:
        env = os.environ if environ is None else environ
        http01 = Socket(*json.loads(env[HTTP01])) if HTTP01 in env else None
        return cls(
            tuple(Socket(*item) for item in json.loads(env[LISTEN])),
            int(env[CONTROL]),
            int(env[PARENT]),
            http01,
        )


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """An endpoint whose ``listen`` adopts an inherited listening socket.

    ``adoptStreamPort`` works on a duplicate, so the inherited descriptor is
    closed here: left open, it would keep the socket listening in this
    process after a graceful stop, queueing connections nobody accepts."""

    def __init__(self, reactor: Any, sock: Socket) -> None:
        self.reactor = reactor
        self.sock = sock

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        port = self.reactor.adoptStreamPort(self.sock.fd, self.sock.family, factory)
        os.close(self.sock.fd)
        return succeed(port)


class ParentChannel:
    """Says the worker's state to the parent, one sd_notify word a line."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __call__(self, state: str) -> bool:
        try:
            # A few bytes on a pipe the parent keeps reading: written whole.
            os.write(self.fd, state.encode("ascii") + b"\n")
        except OSError as e:
            log.warn("cannot tell the supervisor {state}: {error}", state=state, error=str(e))
            return False
        return True


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the parent goes (killed, crashed), so
    a worker never outlives its supervisor: it drains as on a stop and the
    sockets close. If the parent went before we asked, stop now.

    The worker also leaves the parent's process group: a terminal's Ctrl-C
    (or ``timeout``'s signal to the group) then reaches the parent alone,
    which stops the workers itself, once."""
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        pass
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def family_of(fd: int) -> int:
    """The address family of a socket descriptor (without taking it over)."""
    probe = socket.socket(fileno=fd)
    try:
        return int(probe.family)
    finally:
        probe.detach()
