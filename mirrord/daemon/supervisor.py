"""``workers = N`` (N > 1): the parent process that binds the listening
sockets, starts N worker processes that serve them, and supervises them.

The parent serves no request. It binds every listener in
``privilegedStartService`` (before twistd drops privileges) and never
accepts on them; each worker inherits the bound sockets and accepts from
the same kernel queue, so the kernel spreads connections over whichever
workers are free, and a worker's death loses only its own connections.

What the parent does, and why here:

- **Restart.** A worker that exits is started again after a delay that
  doubles with each quick death (``FIRST_DELAY`` up to ``MAX_DELAY``), so a
  worker that cannot start does not spin. Once the restart is scheduled,
  ``worker_gone`` is called with the dead worker's pid: its connections,
  requests in flight and fills in progress stop counting in the shared
  table and metrics (a failure there is logged; the restart stands).
- **Reload (SIGHUP).** The parent checks the new configuration first, as a
  worker would (file, certificate, key, ciphers). A broken one is logged and
  no worker is told: all keep running the old one. A good one is copied to
  ``<shared_dir>/config.toml``, which the workers read, and every worker gets
  SIGHUP. Workers (re)started later read that copy too, so a broken file on
  disk never reaches a new worker either. A worker still starting cannot
  take a signal (no handler yet): it gets the SIGHUP it missed when it says
  ``READY=1`` (so one that read the old file or certificate, e.g. while
  worker 1 renewed it, does not keep them); likewise SIGUSR1.
- **Stop (SIGTERM, SIGINT).** ``STOPPING=1``, the parent closes its copies of
  the sockets, every worker gets SIGTERM and drains within ``grace_period``
  as a single process does; stragglers get SIGKILL after ``grace_period +
  STOP_MARGIN``; the parent exits 0.
- **systemd.** Only the parent talks to systemd (``NOTIFY_SOCKET`` is taken
  out of the workers' environment): one ``READY=1`` when every worker has
  said, through its pipe, that it listens; ``RELOADING=1``/``READY=1``
  around a reload. The unit wants ``KillMode=mixed`` (systemd's SIGTERM goes
  to the parent alone, which passes it on) and ``NotifyAccess=main``.
- **SIGUSR1** (reopen the access log after logrotate) is passed on.

Logs stay one stream because the workers write to the parent's own
standard output and error (inherited, not piped through the parent): a
structured event is one JSON line written with one ``write`` (whole on a
pipe or the journal's stream up to 4 KiB, the size of every access event),
tagged ``worker=i`` by ``mirrord.daemon.logs``. Relaying every line through
the parent would cost the parent a share of a core at a few thousand
requests a second, and would make it a bottleneck it need not be. The
access log file (``access_log``) is opened by every worker in append mode
and written a whole line per ``write``, so lines never mix, and each worker
reopens it on the SIGUSR1 passed on to it.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mirrord.daemon.inherited import Inherited, Socket, family_of
from mirrord.daemon.role import Role
from mirrord.daemon.systemd import notify
from mirrord.front.workershare import worker_gone

log = Logger()

# The child's fd for its pipe to the parent; the sockets follow it.
CONTROL_FD = 3
# Restart delays: the first after a quick death, doubling to the cap. A
# worker that ran STABLE seconds before it died starts again at FIRST_DELAY.
FIRST_DELAY = 0.5
MAX_DELAY = 30.0
STABLE = 60.0
# Past grace_period, how long stopping workers get before SIGKILL, and how
# long the parent then waits for the killed to be reaped.
STOP_MARGIN = 10.0
KILL_WAIT = 5.0
# How long a reload waits for every worker's READY=1 before saying READY=1.
RELOAD_WAIT = 30.0
# Environment a worker must not see: systemd's, meant for the parent alone.
PARENT_ONLY = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC")


@dataclass
class Bound:
    """A socket the parent bound for the workers (and never accepts on)."""

    entry: str
    port: IListeningPort
    # The ACME http-01 listener: only worker 1, where ACME runs, gets it.
    http01: bool = False

    def fileno(self) -> int:
        return int(self.port.fileno())  # type: ignore[attr-defined]


@dataclass
class Worker:
    index: int
    process: IProcessTransport | None = None
    pid: int = 0
    started: float = 0.0
    ready: bool = False
    failures: int = 0
    restart: IDelayedCall | None = None
    # How many of each signal the workers were sent (``Supervisor.sent``)
    # when this one was launched: what it missed while it started.
    sent: dict[str | int, int] = field(default_factory=dict)


class WorkerProtocol(ProcessProtocol):
    """One worker process: its pipe of sd_notify words, and its end."""

    def __init__(self, supervisor: Supervisor, worker: Worker) -> None:
        self.supervisor = supervisor
        self.worker = worker
        self._buffer = b""
        self.pid = 0

    def connectionMade(self) -> None:
        self.pid = int(self.transport.pid or 0)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != CONTROL_FD:
            return
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        self._buffer = self._buffer[-256:]  # a pipe of short words: bounded
        for line in lines:
            if self.supervisor.worker_protocol(self.worker) is self:
                self.supervisor.said(self.worker, line.decode("ascii", "replace").strip())

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.ended(self.worker, self, reason)


Launch = Callable[[int, Sequence[Bound], ProcessProtocol], IProcessTransport]


class Supervisor(Service):
    """Starts ``count`` workers and keeps them running; see the module."""

    name = "supervisor"

    def __init__(
        self,
        reactor: Any,
        count: int,
        shared_dir: Path,
        bind: Callable[[], list[Bound]],
        launch: Launch,
        check: Callable[[], object],  # raises what is wrong; returns the Config
        grace_period: float,
        prepare: Callable[[], None] = lambda: None,
        notify: Callable[[str], object] = notify,
        exited: Callable[[int, int, Path], None] = worker_gone,
    ) -> None:
        self.reactor = reactor
        self.count = count
        self.shared_dir = shared_dir
        self.bind = bind
        self.launch = launch
        self.check = check
        self.grace_period = grace_period
        self.prepare = prepare
        self.notify = notify
        self.exited = exited
        self.bound: list[Bound] = []
        self.workers = [Worker(i) for i in range(1, count + 1)]
        self.announced = False
        self.stopping = False
        self._protocols: dict[int, WorkerProtocol] = {}
        self._awaiting: set[int] = set()
        self._reload_timer: IDelayedCall | None = None
        self._gone: Deferred[None] | None = None
        self._kill_timer: IDelayedCall | None = None
        # Reloads (HUP) and reopens (USR1) passed on so far, by signal: a
        # worker still starting when one happened gets it once it listens.
        self.sent: dict[str | int, int] = {}

    # -- lifecycle ---------------------------------------------------------

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.bound = self.bind()

    def startService(self) -> None:
        super().startService()
        # After twistd dropped privileges: the workers must own what is in
        # the shared directory.
        empty(self.shared_dir)
        (self.shared_dir / "metrics").mkdir()
        self.prepare()
        for worker in self.workers:
            self._start(worker)
        if hasattr(self.reactor, "callFromThread"):
            self.reactor.callWhenRunning(self._install_signal_handlers)

    def _install_signal_handlers(self) -> None:
        from mirrord.daemon.service import install_signal_handlers

        install_signal_handlers(
            self.reactor,
            reload=lambda: self.reload("SIGHUP"),
            # signalProcess knows HUP, INT, KILL, STOP, TERM by name only.
            reopen=lambda: self.forward(signal.SIGUSR1),
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.stopping = True
        self.notify("STOPPING=1")
        for worker in self.workers:
            if worker.restart is not None and worker.restart.active():
                worker.restart.cancel()
            worker.restart = None
        if self._reload_timer is not None and self._reload_timer.active():
            self._reload_timer.cancel()
        for bound in self.bound:
            # The workers close theirs: with ours closed too, the port is
            # closed, and no connection waits in a queue nobody reads.
            bound.port.stopListening()
        live = [w for w in self.workers if w.process is not None]
        if not live:
            return succeed(None)
        log.info(
            "stopping {count} workers: each drains within {grace}s",
            count=len(live),
            grace=self.grace_period,
        )
        self._gone = Deferred()
        for worker in live:
            self._signal(worker, "TERM")
        self._kill_timer = self.reactor.callLater(
            self.grace_period + STOP_MARGIN, self._kill_stragglers
        )
        return self._gone

    def _kill_stragglers(self) -> None:
        live = [w for w in self.workers if w.process is not None]
        for worker in live:
            log.warn(
                "worker {index} (pid {pid}) still running after {seconds}s: killing it",
                index=worker.index,
                pid=worker.pid,
                seconds=self.grace_period + STOP_MARGIN,
            )
            self._signal(worker, "KILL")
        # Reaped at once, normally; never wait without a bound.
        self._kill_timer = self.reactor.callLater(KILL_WAIT, self._all_gone)

    def _all_gone(self) -> None:
        if self._kill_timer is not None and self._kill_timer.active():
            self._kill_timer.cancel()
        if self._gone is not None and not self._gone.called:
            self._gone.callback(None)

    # -- workers -----------------------------------------------------------

    def worker_protocol(self, worker: Worker) -> WorkerProtocol | None:
        return self._protocols.get(worker.index)

    def _start(self, worker: Worker) -> None:
        worker.restart = None
        if self.stopping:
            return
        protocol = WorkerProtocol(self, worker)
        try:
            process = self.launch(worker.index, self.bound, protocol)
        except OSError as e:
            log.error("cannot start worker {index}: {error}", index=worker.index, error=str(e))
            self._schedule_restart(worker)
            return
        self._protocols[worker.index] = protocol
        worker.process = process
        worker.pid = int(process.pid or 0)
        worker.started = self.reactor.seconds()
        worker.ready = False
        worker.sent = dict(self.sent)
        log.info("worker {index} started: pid {pid}", index=worker.index, pid=worker.pid)

    def said(self, worker: Worker, word: str) -> None:
        """A line from a worker's pipe."""
        if word == "READY=1":
            if not worker.ready:
                worker.ready = True
                log.info("worker {index} (pid {pid}) listens", index=worker.index, pid=worker.pid)
                self._catch_up(worker)
                if not self.announced and all(w.ready for w in self.workers):
                    self.announced = True
                    log.info("all {count} workers listen", count=self.count)
                    self.notify("READY=1")
            elif worker.index in self._awaiting:
                self._awaiting.discard(worker.index)
                if not self._awaiting:
                    self._reloaded()
        elif word == "RENEWED=1":
            self.reload(f"worker {worker.index} renewed the ACME certificate")

    def _catch_up(self, worker: Worker) -> None:
        """Send a worker that just said READY=1 each signal the others were
        sent while it started (and it could not be: no handlers yet). It
        may have read the old configuration or certificate, or opened the
        access log before logrotate moved it."""
        for name, count in self.sent.items():
            if worker.sent.get(name, 0) != count:
                log.info(
                    "worker {index} (pid {pid}) started before a {signal}: sending it now",
                    index=worker.index,
                    pid=worker.pid,
                    signal=name,
                )
                if name == "HUP" and self._reload_timer is not None:
                    self._awaiting.add(worker.index)  # READY=1 waits for it too
                self._signal(worker, name)
        worker.sent = dict(self.sent)

    def ended(self, worker: Worker, protocol: WorkerProtocol, reason: Failure) -> None:
        if self._protocols.get(worker.index) is not protocol:
            return
        del self._protocols[worker.index]
        pid = protocol.pid or worker.pid
        worker.process = None
        worker.ready = False
        self._awaiting.discard(worker.index)
        code = getattr(reason.value, "exitCode", None)
        by = getattr(reason.value, "signal", None)
        how = f"was killed by signal {by}" if by else f"exited with status {code}"
        delay = None
        if not self.stopping:
            # The restart first: nothing below may cost the host a worker.
            if self.reactor.seconds() - worker.started >= STABLE:
                worker.failures = 0
            delay = self._schedule_restart(worker)
        try:
            self.exited(worker.index, pid, self.shared_dir)
        except Exception:
            # EMFILE, ENOSPC, permissions: the dead worker's share may be
            # left counted, which is better than a worker short.
            log.failure(
                "clearing the share of worker {index} (pid {pid}) failed",
                index=worker.index,
                pid=pid,
            )
        if delay is None:
            log.info("worker {index} (pid {pid}) {how}", index=worker.index, pid=pid, how=how)
            if all(w.process is None for w in self.workers):
                self._all_gone()
            return
        log.error(
            "worker {index} (pid {pid}) {how}; starting a new one in {delay}s",
            index=worker.index,
            pid=pid,
            how=how,
            status=code,
            signal=by,
            delay=delay,
        )
        if self._awaiting == set() and self._reload_timer is not None:
            self._reloaded()

    def _schedule_restart(self, worker: Worker) -> float:
        worker.failures += 1
        delay = min(FIRST_DELAY * 2 ** (worker.failures - 1), MAX_DELAY)
        worker.restart = self.reactor.callLater(delay, self._start, worker)
        return delay

    def _signal(self, worker: Worker, name: str | int) -> None:
        if worker.process is None:
            return
        try:
            worker.process.signalProcess(name)
        except ProcessExitedAlready:
            pass

    # -- signals -----------------------------------------------------------

    def reload(self, why: str) -> None:
        """Check the configuration; if good, every listening worker reloads."""
        if self.stopping:
            return
        self.notify("RELOADING=1")
        try:
            checked = self.check()
        except Exception as e:
            log.error(
                "reload ({why}) refused, every worker keeps the running setup: {error}",
                why=why,
                error=str(e),
            )
            self.notify("READY=1")
            return
        wanted = getattr(checked, "workers", self.count)
        if wanted != self.count:
            log.warn(
                "workers changed ({running} -> {wanted}): takes effect on restart",
                running=self.count,
                wanted=wanted,
            )
        # Only workers that said READY=1 have their SIGHUP handler: one
        # still starting would die of the signal (it reads the new file).
        # Those still starting get it when they listen (``_catch_up``).
        told = [w for w in self.workers if w.ready and w.process is not None]
        self._count("HUP")
        self._awaiting = {w.index for w in told}
        for worker in told:
            self._signal(worker, "HUP")
        log.info("reload ({why}): told {count} workers", why=why, count=len(told))
        if self._reload_timer is not None and self._reload_timer.active():
            self._reload_timer.cancel()
        if not self._awaiting:
            self._reloaded()
            return
        self._reload_timer = self.reactor.callLater(RELOAD_WAIT, self._reloaded)

    def _count(self, name: str | int) -> None:
        self.sent[name] = self.sent.get(name, 0) + 1
        for worker in self.workers:
            if worker.ready:
                worker.sent[name] = self.sent[name]

    def _reloaded(self) -> None:
        if self._reload_timer is not None and self._reload_timer.active():
            self._reload_timer.cancel()
        self._reload_timer = None
        if self._awaiting:
            log.warn(
                "workers {indices} did not confirm the reload within {seconds}s",
                indices=", ".join(map(str, sorted(self._awaiting))),
                seconds=RELOAD_WAIT,
            )
            self._awaiting = set()
        self.notify("READY=1")

    def forward(self, name: str | int) -> None:
        """Pass a signal on to every worker that has its handlers; the
        others get it when they have them."""
        self._count(name)
        for worker in self.workers:
            if worker.ready:
                self._signal(worker, name)


def empty(directory: Path) -> None:
    """``directory`` exists and is empty (what a previous run left is gone)."""
    if directory.is_dir() and not directory.is_symlink():
        shutil.rmtree(directory)
    elif directory.exists() or directory.is_symlink():
        directory.unlink()
    directory.mkdir(parents=True, mode=0o750)


@dataclass
class Launcher:
    """Starts worker ``i`` as a child process running ``argv`` with the
    bound sockets as descriptors 4, 5, ... (the http-01 one to worker 1
    only), its pipe to the parent as 3, and the parent's stdout/stderr."""

    reactor: Any
    argv: list[str]
    count: int
    shared_dir: Path
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    def environment(self, index: int, sockets: list[Socket]) -> dict[str, str]:
        env = {k: v for k, v in self.environ.items() if k not in PARENT_ONLY}
        listeners = tuple(s for s in sockets if s.entry != "http-01")
        http01 = next((s for s in sockets if s.entry == "http-01"), None)
        env.update(Role(index, self.count, self.shared_dir).environ())
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self.shared_dir / "metrics")
        env.update(Inherited(listeners, CONTROL_FD, os.getpid(), http01).environ())
        return env

    def __call__(
        self, index: int, bound: Sequence[Bound], protocol: ProcessProtocol
    ) -> IProcessTransport:
        child_fds: dict[int, int | str] = {0: 0, 1: 1, 2: 2, CONTROL_FD: "r"}
        sockets: list[Socket] = []
        fd = CONTROL_FD + 1
        for item in bound:
            if item.http01 and index != 1:
                continue
            child_fds[fd] = item.fileno()
            entry = "http-01" if item.http01 else item.entry
            sockets.append(Socket(fd, family_of(item.fileno()), entry))
            fd += 1
        return self.reactor.spawnProcess(
            protocol,
            self.argv[0],
            self.argv,
            env=self.environment(index, sockets),
            childFDs=child_fds,
        )
