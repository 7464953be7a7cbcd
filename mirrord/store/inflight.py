"""Which digests are being fetched right now, daemon-wide: one upstream
fetch per digest whatever clients do.

The table is one per store, shared by every registry (the store is
content-addressed, so one digest pulled through two registries is one
blob). An entry is first a ``Starting`` (the upstream GET is on its way;
whoever asked first is its leader), then the running ``Fill``. The start
belongs to the table, not to the leader's request: a leader that leaves
before the upstream answers does not cancel it. Waiters are woken when it
settles and look at the table again: a started fill is followed, and an
answer the leader could not turn into a fill (a 401, a 503, an error) lets
exactly one of them try next while the others wait on that one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mirrord.store.fill import Fill
from mirrord.store.follow import RemoteFill

# A fill this process runs, or another process's that it follows.
Running = Fill | RemoteFill

T = TypeVar("T")


class Starting(Generic[T]):
    """An upstream GET that will either become a fill or an answer for its
    leader alone. ``orphaned`` is called with the outcome when the leader
    has gone and nobody else will read it."""

    def __init__(self, orphaned: Callable[[T], object]) -> None:
        self.leader_gone = False
        self._orphaned = orphaned
        self._waiters: list[Deferred[None]] = []
        self._leader: Deferred[T] | None = None
        self._outcome: T | Failure | None = None
        self.settled = False

    def lead(self) -> Deferred[T]:
        """The leader's view of the outcome; cancelling it leaves the work running."""
        mine: Deferred[T] = Deferred(lambda _: self._leave())
        if self.settled:
            self._deliver(mine)
        else:
            self._leader = mine
        return mine

    def wait(self) -> Deferred[None]:
        """Fires (with nothing) once the start settled; cancelling it only stops waiting."""
        waiter: Deferred[None] = Deferred(lambda d: self._waiters.remove(d))
        if self.settled:
            waiter.callback(None)
        else:
            self._waiters.append(waiter)
        return waiter

    def _leave(self) -> None:
        self.leader_gone = True
        self._leader = None

    def settle(self, outcome: T | Failure) -> None:
        self.settled = True
        self._outcome = outcome
        if self._leader is not None:
            leader, self._leader = self._leader, None
            self._deliver(leader)
        elif self.leader_gone and not isinstance(outcome, Failure):
            self._orphaned(outcome)
        # Otherwise nobody has asked yet (an upstream can answer before
        # ``lead`` is called): ``lead`` delivers it.
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _deliver(self, to: Deferred[T]) -> None:
        outcome = self._outcome
        if isinstance(outcome, Failure):
            to.errback(outcome)
        else:
            to.callback(outcome)  # type: ignore[arg-type]


class InFlight:
    """digest -> what is happening to it: ``Starting`` or a running fill
    (``Fill``, or a ``RemoteFill`` another process runs)."""

    def __init__(self, on_change: Callable[[], object] = lambda: None) -> None:
        self._table: dict[str, Starting[Any] | Running] = {}
        self._on_change = on_change

    def __len__(self) -> int:
        """The fills this process runs or is starting; a fill it follows
        counts where it runs, so that a sum over workers counts it once."""
        return sum(1 for entry in self._table.values() if not isinstance(entry, RemoteFill))

    def get(self, digest: str) -> Starting[Any] | Running | None:
        current = self._table.get(digest)
        if not isinstance(current, Starting) and current is not None and current.error is not None:
            return None  # failed: the next request starts afresh
        return current

    def start(
        self,
        digest: str,
        work: Deferred[T],
        fill_of: Callable[[T], Running | None],
        orphaned: Callable[[T], object],
    ) -> Starting[T]:
        """Register the upstream GET for ``digest``. When it settles the
        entry becomes the ``Fill`` that ``fill_of`` finds in its outcome,
        or goes."""
        starting: Starting[T] = Starting(orphaned)
        self._table[digest] = starting

        def settled(outcome: T | Failure) -> None:
            # The table first: woken waiters look at it at once.
            fill = None if isinstance(outcome, Failure) else fill_of(outcome)
            if self._table.get(digest) is starting:
                if fill is not None and not fill.finished:
                    self._table[digest] = fill
                    fill.done.addBoth(self._ended, digest, fill)
                else:
                    del self._table[digest]
            self._on_change()
            starting.settle(outcome)

        work.addBoth(settled)
        self._on_change()
        return starting

    def _ended(self, result: object, digest: str, fill: Running) -> object:
        if self._table.get(digest) is fill:
            del self._table[digest]
        self._on_change()
        return result
