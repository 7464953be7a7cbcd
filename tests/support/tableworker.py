"""A worker process that takes and frees slots of a small shared client
table as fast as it can, for the test that two real processes never take
one slot for two clients. ``python -m tests.support.tableworker FILE INDEX
PREFIX START SECONDS`` works from the clock time START (so that both work
at once, whenever each was ready) for SECONDS; prints how often one of its clients did not read back
the count it had just made (0 when the table's lock does its work)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mirrord.front.clienttable import CONNECTIONS, ClientTable

SLOTS, PROBES, KEYS = 64, 16, 20


def main(path: str, index: str, prefix: str, start: str, seconds: str) -> None:
    table = ClientTable(Path(path), 2, int(index), time.time, slots=SLOTS, probes=PROBES)
    wrong = i = 0
    time.sleep(max(0.0, float(start) - time.time()))
    end = float(start) + float(seconds)
    while time.time() < end:
        i += 1
        key = f"{prefix}{i % KEYS}"
        table.add(key, CONNECTIONS, 1)
        wrong += table.total(key, CONNECTIONS) != 1
        table.add(key, CONNECTIONS, -1)  # the slot is free again, for either worker
    print(wrong)


if __name__ == "__main__":
    main(*sys.argv[1:])
