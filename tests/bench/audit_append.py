"""How fast the audit trail appends: one commit per event against group commit.

    .venv/bin/python -m tests.bench.audit_append [--events N] [--rounds 3]

SQLite in WAL mode with `synchronous=FULL` (the broker's settings), in a throwaway directory
on the disk the system temp directory lives on. Both modes link each event into the chain
(hash included) and make it durable before its caller continues:

- one commit per event: every caller runs its own transaction (`append_batch([event])`),
  as the trail did before group commit;
- group commit: every caller hands its event to the `AuditWriter` and waits for its batch.

For 1, 16 and 64 concurrent callers, prints events per second, the median of the rounds with
their min-max, and the mean batch size of group commit. No HSM is involved: checkpoints are
signed off the append path.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from broker.adapters.sqlite_store import SqliteStore
from broker.domain import AuditEvent, Outcome
from broker.services.audit_writer import AuditWriter, link

CALLERS = (1, 16, 64)


def draft(n: int) -> AuditEvent:
    return AuditEvent(
        0, datetime.now(UTC), "producer", "GenerateDataKey", "patients", 1, "",
        {"dataset": "cohort-42"}, "", Outcome.ALLOWED, "", f"bench-{n}", "", "",
    )  # fmt: skip


class PerEvent:
    """One transaction per event; the chain head is shared under a lock, as one writer's."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.lock = threading.Lock()
        self.position, self.head = 0, "0" * 64

    def append(self, event: AuditEvent) -> None:
        with self.lock:
            linked = link(event, "bench-per-event", self.position + 1, self.head)
            self.store.append_batch([linked])
            self.position, self.head = linked.chain_sequence, linked.hash


def run(append: Callable[[AuditEvent], object], callers: int, events: int) -> float:
    """Events per second with `callers` threads sharing `events` appends."""
    share = events // callers
    start = threading.Barrier(callers + 1)

    def caller(offset: int) -> None:
        start.wait()
        for n in range(share):
            append(draft(offset + n))

    threads = [threading.Thread(target=caller, args=(i * share,)) for i in range(callers)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    return share * callers / (time.perf_counter() - began)


def measure(mode: str, callers: int, events: int, rounds: int) -> tuple[list[float], float]:
    rates, batch_sizes = [], []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            store = SqliteStore(Path(tmp) / "bench.db")
            if mode == "per-event":
                rates.append(run(PerEvent(store).append, callers, events))
            else:
                writer = AuditWriter(store, "bench-group")
                rates.append(run(writer.append, callers, events))
                stats = writer.stats
                batch_sizes.append(stats.events / max(stats.batches, 1))
                writer.close()
            store.close()
    return rates, statistics.mean(batch_sizes) if batch_sizes else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2048, help="events per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"# {platform.platform()}, Python {platform.python_version()}, "
          f"SQLite WAL synchronous=FULL in {tempfile.gettempdir()}; "
          f"{args.events} events per round, median of {args.rounds} rounds (min-max)")  # fmt: skip
    print("| callers | one commit per event (events/s) | group commit (events/s) | mean batch |")
    print("| ---: | ---: | ---: | ---: |")
    for callers in CALLERS:
        cells = []
        batch = 1.0
        for mode in ("per-event", "group"):
            rates, size = measure(mode, callers, args.events, args.rounds)
            cells.append(f"{statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f})")
            batch = size if mode == "group" else batch
        print(f"| {callers} | {cells[0]} | {cells[1]} | {batch:.1f} |")


if __name__ == "__main__":
    main()
