"""Each rank's heartbeat in the rendezvous store, so that a rank whose watchdog fires can name who was lost.

A partition raises nothing: both sides of a cut link wait in a collective until their watchdogs fire, and all a
watchdog knows by itself is that its own rank made no progress. The store torchrun's workers rendezvous through
(the agent's TCPStore at MASTER_ADDR:MASTER_PORT, on one node) is reachable from every rank for the life of the job,
so each rank writes a small record there every few seconds from a thread of its own (a store behind a cut link
blocks that thread, never the training thread nor the watchdog's). When the watchdog fires it reads them:
- on the store's side of a cut, the ranks whose records stopped are the lost ones;
- on the other side, its own writes stopped being answered: the store's node is the one it lost;
- with every record fresh, no rank was lost, and the ranks doing something else than this one are the ones to
  look at (a rank stalled in a save while its peers wait in the next step's collective).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch.distributed as dist

Peers = list[tuple[str, str]]  # each rank's (host, address), as distributed.Dist.peers holds them


def interval(hang_seconds: float) -> float:
    """Seconds between two heartbeats: a tenth of the hang timeout, between 0.5 and 5 s (a 4,096-rank job then
    writes to the store about 800 times a second, well within what a TCPStore serves)."""
    return min(5.0, max(0.5, hang_seconds / 10))


def stale_after(hang_seconds: float) -> float:
    """A record older than this is a lost rank's: three missed beats, plus 5 s for clocks that differ by seconds
    between nodes (the age is this node's clock against the writer's)."""
    return 3 * interval(hang_seconds) + 5.0


def name_ranks(ranks: list[int], peers: Peers) -> str:
    """ "rank 1 on HOST (ADDR)", or "ranks 8-15 on HOST (ADDR)" for the ranks of one node."""
    by_node: dict[tuple[str, str], list[int]] = {}
    for rank in ranks:
        by_node.setdefault(peers[rank] if rank < len(peers) else ("?", "?"), []).append(rank)
    parts = []
    for (host, addr), group in by_node.items():
        which = f"rank {group[0]}" if len(group) == 1 else f"ranks {_spans(group)}"
        parts.append(f"{which} on {host} ({addr})")
    return ", ".join(parts)


def _spans(ranks: list[int]) -> str:
    spans: list[list[int]] = []
    for rank in ranks:
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


class Heartbeat:
    """This rank's heartbeat thread (a no-op in a world of one or without a rendezvous store): every `interval`
    it writes `progress()` (steps completed, phase) with the time, and notes when the store last answered."""

    def __init__(
        self,
        rank: int,
        peers: Peers,
        progress: Callable[[], tuple[int, str]],
        hang_seconds: Callable[[], float],
    ) -> None:
        self.rank, self.peers, self.progress, self.hang_seconds = rank, peers, progress, hang_seconds
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        self.store_at = (addr, int(port)) if addr and port and len(peers) > 1 else None
        attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
        self.prefix = f"curry_train/heartbeat/{attempt}/"
        self.answered = time.monotonic()  # when the store last answered this rank's heartbeat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.store_at is not None:
            self._thread = threading.Thread(target=self._beat, name="curry-train-heartbeat", daemon=True)
            self._thread.start()

    def _connect(self, timeout: float) -> dist.TCPStore:
        import torch.distributed as dist  # here: the plan reads the hang timeout without importing torch

        assert self.store_at is not None
        host, port = self.store_at
        return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout))

    def _beat(self) -> None:
        store = None
        while True:
            wait = interval(self.hang_seconds())
            try:
                store = store or self._connect(2 * wait)
                step, phase = self.progress()
                key = f"{self.prefix}{self.rank}"
                store.set(key, json.dumps({"time": time.time(), "step": step, "phase": phase}))
                store.check([key])  # a round trip: a set alone may be buffered without the store's answer
                self.answered = time.monotonic()
            except Exception:  # noqa: BLE001 (unreachable, timed out, closed: the silence is what gets reported)
                store = None
            if self._stop.wait(wait):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # Not joined for long: behind a cut link the thread may sit in a store call until its timeout.
            self._thread.join(timeout=1.0)

    def read(self, timeout: float = 5.0) -> dict[int, dict[str, Any]]:
        """Every other rank's last record (a rank that never wrote one is absent), through a connection of its
        own: the heartbeat thread's may be blocked behind a cut link."""
        store = self._connect(timeout)
        records = {}
        for rank in range(len(self.peers)):
            key = f"{self.prefix}{rank}"
            if rank != self.rank and store.check([key]):
                records[rank] = json.loads(store.get(key))
        return records

    def report(self) -> tuple[str, list[int]]:
        """What the watchdog adds to its line when it fires, and the ranks it counts as lost."""
        if self.store_at is None:
            return "", []
        hang = self.hang_seconds()
        silent = time.monotonic() - self.answered
        if silent > stale_after(hang):
            return self._store_lost(silent)
        try:
            records = self.read()
        except Exception as err:  # noqa: BLE001
            return f"; the rendezvous store did not answer ({type(err).__name__}), so no peer can be named", []
        now = time.time()
        lost = [r for r in range(len(self.peers)) if r != self.rank and r not in records]
        lost += [r for r, rec in records.items() if now - float(rec["time"]) > stale_after(hang)]
        if lost:
            lost.sort()
            ages = [now - float(records[r]["time"]) for r in lost if r in records]
            since = f"no heartbeat for {max(ages):.0f} s" if ages else "no heartbeat"
            return f"; lost {name_ranks(lost, self.peers)}: {since}", lost
        step, phase = self.progress()
        elsewhere = sorted(r for r, rec in records.items() if (rec["step"], rec["phase"]) != (step, phase))
        if not elsewhere:
            return "; every rank's heartbeat is current and every rank is where this one is", []
        shown = "; ".join(
            f"{name_ranks([r], self.peers)} is alive, {records[r]['step']} steps done, during {records[r]['phase']}"
            for r in elsewhere[:3]
        )
        more = f" (and {len(elsewhere) - 3} more ranks elsewhere)" if len(elsewhere) > 3 else ""
        return f"; no rank lost: {shown}{more}", []

    def _store_lost(self, silent: float) -> tuple[str, list[int]]:
        assert self.store_at is not None
        host, port = self.store_at
        there = [r for r, (_, addr) in enumerate(self.peers) if addr == host and r != self.rank]
        if there:
            store = f"the rendezvous store on its node has not answered for {silent:.0f} s"
            return f"; lost {name_ranks(there, self.peers)}: {store}", there
        return f"; lost the rendezvous store at {host}:{port}: no answer for {silent:.0f} s", []
