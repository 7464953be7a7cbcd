"""The supervisor of ``workers = N``: restarts, reload, READY and stop, on a
``task.Clock`` with processes that are driven by the test."""

from __future__ import annotations

import signal
from pathlib import Path

from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mirrord.config import Config, ConfigError
from mirrord.daemon import supervisor
from mirrord.daemon.role import SHARED_DIR, WORKER, WORKERS
from mirrord.daemon.supervisor import CONTROL_FD, Launcher, Supervisor


@implementer(IProcessTransport)
class Child:
    """A worker process as the supervisor sees it: a pid, the signals it
    was sent, and an end the test decides."""

    def __init__(self, pid: int, protocol: ProcessProtocol) -> None:
        self.pid: int | None = pid
        self.protocol = protocol
        self.signals: list[str] = []

    def signalProcess(self, signalID: str | int) -> None:
        if self.pid is None:
            raise ProcessExitedAlready()
        if isinstance(signalID, int):  # as Twisted's own: names for five, else numbers
            signalID = signal.Signals(signalID).name.removeprefix("SIG")
        self.signals.append(signalID)

    def says(self, word: str) -> None:
        self.protocol.childDataReceived(CONTROL_FD, word.encode() + b"\n")

    def dies(self, signal: int | None = 9, status: int | None = None) -> None:
        self.pid = None
        reason = ProcessDone(0) if status == 0 else ProcessTerminated(status, signal)
        self.protocol.processEnded(Failure(reason))

    # The rest of the interface: nothing the supervisor uses.
    def closeStdin(self) -> None: ...
    def closeStdout(self) -> None: ...
    def closeStderr(self) -> None: ...
    def closeChildFD(self, descriptor: int) -> None: ...
    def writeToChild(self, childFD: int, data: bytes) -> None: ...
    def write(self, data: bytes) -> None: ...
    def writeSequence(self, data: list[bytes]) -> None: ...
    def loseConnection(self) -> None: ...
    def getPeer(self) -> object: ...
    def getHost(self) -> object: ...


class Harness:
    def __init__(self, shared: Path, count: int = 2, check=lambda: None) -> None:
        self.clock = Clock()
        self.launched: list[Child] = []
        self.told: list[str] = []
        self.exits: list[tuple[int, int]] = []
        self.supervisor = Supervisor(
            self.clock,
            count,
            shared,
            bind=list,
            launch=self.launch,
            check=check,
            grace_period=30.0,
            notify=self.told.append,
            exited=lambda index, pid, shared_dir: self.exits.append((index, pid)),
        )

    def launch(self, index: int, bound: object, protocol: ProcessProtocol) -> Child:
        child = Child(1000 + len(self.launched), protocol)
        protocol.makeConnection(child)
        self.launched.append(child)
        return child

    def current(self, index: int) -> Child:
        worker = self.supervisor.workers[index - 1]
        assert isinstance(worker.process, Child)
        return worker.process

    def all_ready(self) -> None:
        for worker in self.supervisor.workers:
            self.current(worker.index).says("READY=1")


class SupervisorTests(SynchronousTestCase):
    def harness(self, **kw) -> Harness:
        h = Harness(Path(self.mktemp()), **kw)
        h.supervisor.privilegedStartService()
        h.supervisor.startService()
        return h

    def test_child_double_implements_the_process_transport(self) -> None:
        """The test's process double is a whole IProcessTransport."""
        self.assertTrue(verifyObject(IProcessTransport, Child(1, ProcessProtocol())))

    def test_a_dead_worker_is_replaced_after_a_doubling_bounded_delay(self) -> None:
        """A worker that keeps dying is restarted after 0.5, 1, 2 ... seconds up to 30;
        after a long run the delay starts over; the hook hears every dead pid."""
        h = self.harness()
        self.assertEqual(len(h.launched), 2)
        delays = []
        for _ in range(9):
            dead = h.current(1)
            started = len(h.launched)
            dead.dies()
            waited = 0.0
            while len(h.launched) == started:
                h.clock.advance(0.25)
                waited += 0.25
            delays.append(waited)
        self.assertEqual(delays, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0])
        self.assertEqual(h.exits[0], (1, 1000))
        self.assertEqual(len(h.exits), 9)
        self.assertIs(h.current(2), h.launched[1])  # the other worker untouched

        h.clock.advance(supervisor.STABLE)
        h.current(1).dies(signal=None, status=1)
        started = len(h.launched)
        h.clock.advance(0.5)
        self.assertEqual(len(h.launched), started + 1)

    def test_a_failing_exit_hook_does_not_stop_the_restart(self) -> None:
        """When clearing a dead worker's share fails (EMFILE, ENOSPC...), the failure is
        logged and the worker is still replaced."""

        def exited(index: int, pid: int, shared_dir: Path) -> None:
            raise OSError(24, "Too many open files")

        h = self.harness()
        h.supervisor.exited = exited
        h.current(1).dies()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        h.clock.advance(supervisor.FIRST_DELAY)
        self.assertEqual(len(h.launched), 3)
        self.assertIs(h.current(1), h.launched[2])

    def test_ready_is_said_once_when_every_worker_listens(self) -> None:
        """systemd hears READY=1 once, when the last worker listens, not at each restart."""
        h = self.harness(count=3)
        h.current(1).says("READY=1")
        h.current(2).says("READY=1")
        self.assertEqual(h.told, [])
        h.current(3).says("READY=1")
        self.assertEqual(h.told, ["READY=1"])
        h.current(2).dies()
        h.clock.advance(1)
        h.current(2).says("READY=1")
        self.assertEqual(h.told, ["READY=1"])

    def test_a_broken_config_on_reload_reaches_no_worker(self) -> None:
        """SIGHUP with a configuration that fails the check signals no worker; a good one
        signals every worker, and READY=1 follows their confirmations."""
        broken = [True]

        def check() -> None:
            if broken[0]:
                raise ConfigError("mirrord.toml: key 'workers' must be >= 1, not 0")

        h = self.harness(check=check)
        h.all_ready()
        h.told.clear()
        h.supervisor.reload("SIGHUP")
        self.assertEqual([h.current(i).signals for i in (1, 2)], [[], []])
        self.assertEqual(h.told, ["RELOADING=1", "READY=1"])

        broken[0] = False
        h.told.clear()
        h.supervisor.reload("SIGHUP")
        self.assertEqual([h.current(i).signals for i in (1, 2)], [["HUP"], ["HUP"]])
        self.assertEqual(h.told, ["RELOADING=1"])
        h.current(1).says("RELOADING=1")
        h.current(1).says("READY=1")
        self.assertEqual(h.told, ["RELOADING=1"])
        h.current(2).says("READY=1")
        self.assertEqual(h.told, ["RELOADING=1", "READY=1"])

    def test_a_new_worker_count_waits_for_a_restart(self) -> None:
        """A reload whose file asks for another number of workers keeps the running
        ones and says the change takes a restart."""
        h = self.harness(check=lambda: Config(workers=3))
        h.all_ready()
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        h.supervisor.reload("SIGHUP")
        self.assertEqual(len(h.supervisor.workers), 2)
        self.assertEqual([h.current(i).signals for i in (1, 2)], [["HUP"], ["HUP"]])
        self.assertIn(
            (2, 3), [(e.get("running"), e.get("wanted")) for e in events if "wanted" in e]
        )

    def test_a_starting_worker_is_not_sent_signals(self) -> None:
        """SIGHUP and SIGUSR1 go only to workers that said READY=1 (a starting worker
        would die of them: its handlers are not installed yet)."""
        h = self.harness()
        h.current(1).says("READY=1")
        h.supervisor.reload("SIGHUP")
        h.supervisor.forward(signal.SIGUSR1)
        self.assertEqual(h.current(1).signals, ["HUP", "USR1"])
        self.assertEqual(h.current(2).signals, [])

    def test_a_worker_starting_during_a_reload_catches_up_when_ready(self) -> None:
        """A worker still starting when a reload (or a log reopen) happened gets SIGHUP
        (and SIGUSR1) as soon as it says READY=1, so it never keeps the old setup; one
        started after them gets neither, and a later READY=1 sends nothing again."""
        h = self.harness(count=3)
        h.current(1).says("READY=1")
        h.current(1).says("RENEWED=1")
        h.supervisor.forward(signal.SIGUSR1)
        self.assertEqual(h.current(1).signals, ["HUP", "USR1"])
        self.assertEqual(h.current(2).signals, [])
        h.current(3).dies()  # its replacement starts after the reload and the reopen
        h.clock.advance(supervisor.FIRST_DELAY)
        h.current(2).says("READY=1")
        h.current(3).says("READY=1")
        self.assertEqual(h.current(2).signals, ["HUP", "USR1"])
        self.assertEqual(h.current(3).signals, [])
        h.current(2).says("READY=1")  # its confirmation of the reload
        self.assertEqual(h.current(2).signals, ["HUP", "USR1"])

    def test_a_reload_waits_for_the_worker_that_caught_up(self) -> None:
        """After a reload, systemd hears READY=1 only when a worker that was starting
        has listened, been sent its SIGHUP and confirmed it too."""
        h = self.harness()
        h.all_ready()
        h.current(2).dies()
        h.clock.advance(supervisor.FIRST_DELAY)  # a new worker 2, starting
        h.told.clear()
        h.supervisor.reload("SIGHUP")
        h.current(2).says("READY=1")
        self.assertEqual(h.current(2).signals, ["HUP"])
        h.current(1).says("READY=1")
        self.assertEqual(h.told, ["RELOADING=1"])
        h.current(2).says("READY=1")
        self.assertEqual(h.told, ["RELOADING=1", "READY=1"])

    def test_a_renewed_certificate_reloads_every_worker(self) -> None:
        """Worker 1 saying RENEWED=1 (ACME) makes every worker reload."""
        h = self.harness()
        h.all_ready()
        h.current(1).says("RENEWED=1")
        self.assertEqual([h.current(i).signals for i in (1, 2)], [["HUP"], ["HUP"]])

    def test_reload_waits_a_bounded_time_for_confirmations(self) -> None:
        """A worker that never confirms a reload delays READY=1 by RELOAD_WAIT at most."""
        h = self.harness()
        h.all_ready()
        h.told.clear()
        h.supervisor.reload("SIGHUP")
        h.current(1).says("READY=1")
        h.clock.advance(supervisor.RELOAD_WAIT - 1)
        self.assertEqual(h.told, ["RELOADING=1"])
        h.clock.advance(1)
        self.assertEqual(h.told, ["RELOADING=1", "READY=1"])

    def test_stop_terms_then_kills_stragglers_within_a_bound(self) -> None:
        """Stopping says STOPPING=1, sends SIGTERM to every worker, SIGKILL to those still
        running after grace_period + margin, and ends a bounded time later; nobody
        is restarted."""
        h = self.harness()
        h.all_ready()
        stopped = h.supervisor.stopService()
        self.assertIn("STOPPING=1", h.told)
        self.assertEqual([h.current(i).signals for i in (1, 2)], [["TERM"], ["TERM"]])
        h.current(1).dies(signal=None, status=0)
        h.clock.advance(30 + supervisor.STOP_MARGIN - 0.1)
        self.assertNoResult(stopped)
        self.assertEqual(h.current(2).signals, ["TERM"])
        h.clock.advance(0.1)
        self.assertEqual(h.current(2).signals, ["TERM", "KILL"])
        h.clock.advance(supervisor.KILL_WAIT)
        self.successResultOf(stopped)
        self.assertEqual(len(h.launched), 2)

    def test_stop_ends_when_the_last_worker_exits(self) -> None:
        """When every worker has drained, the stop ends at once, and no timer is left."""
        h = self.harness()
        h.all_ready()
        h.current(1).dies()  # dies before the stop: a restart is pending
        stopped = h.supervisor.stopService()
        h.current(2).dies(signal=None, status=0)
        self.successResultOf(stopped)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(len(h.launched), 2)

    def test_shared_dir_is_emptied_at_start(self) -> None:
        """The supervisor starts from an empty shared directory with a metrics folder."""
        shared = Path(self.mktemp())
        (shared / "metrics").mkdir(parents=True)
        (shared / "metrics" / "counter_123.db").write_bytes(b"old")
        h = Harness(shared)
        h.supervisor.privilegedStartService()
        h.supervisor.startService()
        self.assertEqual(sorted(p.name for p in shared.iterdir()), ["metrics"])
        self.assertEqual(list((shared / "metrics").iterdir()), [])


class LauncherTests(SynchronousTestCase):
    def test_worker_environment_names_its_role_and_hides_systemd(self) -> None:
        """A worker's environment gives its role, the shared and metrics directories,
        its pipe, and not systemd's socket (the parent alone talks to systemd)."""
        shared = Path("/state/workers")
        launcher = Launcher(
            None, ["twistd"], 4, shared, {"NOTIFY_SOCKET": "/run/notify", "PATH": "/bin"}
        )
        env = launcher.environment(3, [])
        self.assertNotIn("NOTIFY_SOCKET", env)
        self.assertEqual(env["PATH"], "/bin")
        self.assertEqual((env[WORKER], env[WORKERS], env[SHARED_DIR]), ("3", "4", str(shared)))
        self.assertEqual(env["PROMETHEUS_MULTIPROC_DIR"], "/state/workers/metrics")
        self.assertEqual(env["MIRRORD_CONTROL_FD"], str(CONTROL_FD))
