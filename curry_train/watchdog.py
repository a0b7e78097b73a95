"""The hang watchdog: a rank that makes no progress for `train.hang_timeout_s` ends the job, with its stacks.

A rank stuck in a collective whose peer is gone behind a partition, on a filesystem that never returns, or in a
deadlock, raises nothing: without a watchdog the job holds its nodes until a collective timeout (gloo: 30 minutes)
or forever. Every rank runs its own watchdog, a daemon thread, so a rank ends even when no message from its peers
can reach it; the first rank to end also closes its connections, which ends peers that can still see it sooner.

Progress is a completed step or a change of phase (saving, evaluating, loading), told by the loop with `beat`.
The watchdog is armed after the first step: start-up (imports, data, model build, the first step's warm-up) is
not a hang. The timeout is `train.hang_timeout_s` when given; else `hang_timeout` below, which grows with the
slowest interval between progress marks seen, so a legitimately long save is never taken for a hang.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from curry_train import failures
from curry_train.heartbeat import Heartbeat, Peers, name_ranks
from curry_train.journal import append_from_any_rank, read_journal
from curry_train.layout import RunFiles

HANG_FLOOR_S = 300.0  # the default timeout is never below this: a few minutes absorb a slow filesystem's hiccup
STEP_MULTIPLE = 10.0  # no progress for this many of the slowest interval seen (a step, or a step with its save)
SAVE_MULTIPLE = 3.0  # ... nor for this many of the longest full save this run's journal measured


def hang_timeout(
    explicit: float | None, step_seconds: float | None = None, save_seconds: float | None = None
) -> tuple[float, str]:
    """The hang timeout in seconds and where it comes from: `explicit` as given, else the floor raised to a
    multiple of the slowest step and of the longest save measured."""
    if explicit is not None:
        return explicit, "train.hang_timeout_s"
    candidates = [(HANG_FLOOR_S, f"default floor {HANG_FLOOR_S:.0f} s")]
    if step_seconds:
        candidates.append((STEP_MULTIPLE * step_seconds, f"{STEP_MULTIPLE:g} x the slowest step, {step_seconds:.3g} s"))
    if save_seconds:
        candidates.append((SAVE_MULTIPLE * save_seconds, f"{SAVE_MULTIPLE:g} x the longest save, {save_seconds:.3g} s"))
    return max(candidates)


def collective_timeout(hang_seconds: float) -> float:
    """How long a collective may wait for a peer: a little longer than the hang timeout, so that once armed the
    watchdog fires first (it names the phase and dumps every stack; a timed-out collective only says it timed
    out). Before the watchdog arms, during start-up and the first step, it is the only bound on a wait."""
    return hang_seconds + max(10.0, 0.1 * hang_seconds)


class Watchdog:
    """One rank's watchdog. The training thread calls `arm` after the first step, `beat` at every progress mark,
    and `stop` when the loop ends; when the automatic timeout grows, `on_timeout` is called (on the training thread,
    from `beat`) with the collective timeout that follows it."""

    def __init__(
        self,
        rank: int,
        run_dir: Path,
        explicit: float | None,
        on_timeout: Callable[[float], None] | None = None,
        peers: Peers | None = None,
    ) -> None:
        self.rank, self.run_dir, self.explicit = rank, run_dir, explicit
        self.timeout = hang_timeout(explicit)[0]
        self.on_timeout = on_timeout
        self.phase = "start-up"
        self.step = 0
        self.last = time.monotonic()
        self.slowest = 0.0  # the longest completed interval between progress marks since arming
        self.armed = False
        self._stop = threading.Event()
        # Every rank's heartbeat, read when this watchdog fires to name the rank or node that was lost.
        self.heartbeat = Heartbeat(rank, peers or [], lambda: (self.step, self.phase), lambda: self.timeout)
        self._thread = threading.Thread(target=self._watch, name="curry-train-watchdog", daemon=True)
        self._thread.start()

    def arm(self, step: int, phase: str) -> None:
        self.armed = True
        self.beat(step, phase, measure=False)

    def beat(self, step: int, phase: str, measure: bool = True) -> None:
        """Progress: `phase` (what follows "during": "step 12", "the save of step 12", "loading") has begun, with
        `step` steps completed."""
        now = time.monotonic()
        if self.armed and measure:
            self.slowest = max(self.slowest, now - self.last)
        self.last, self.step, self.phase = now, step, phase
        if self.explicit is None and STEP_MULTIPLE * self.slowest > self.timeout:
            self.timeout = STEP_MULTIPLE * self.slowest
            if self.on_timeout is not None:
                self.on_timeout(collective_timeout(self.timeout))

    def hint(self, seconds: float) -> None:
        """An automatic timeout known before any measurement (the plan's, from this run's journal)."""
        if self.explicit is None and seconds > self.timeout:
            self.timeout = seconds
            if self.on_timeout is not None:
                self.on_timeout(collective_timeout(self.timeout))

    def stop(self) -> None:
        # Joined, not left to die with the interpreter: a daemon thread that wakes during finalization is ended
        # by pthread_exit, which has aborted processes here ("terminate called without an active exception").
        self._stop.set()
        self.heartbeat.stop()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, max(0.5, self.timeout / 20))):
            if self.armed and time.monotonic() - self.last > self.timeout:
                self.fire()

    def fire(self) -> None:
        """Every thread's stack to failures.log, `hang` to the journal, then end this rank with status 1."""
        idle = time.monotonic() - self.last
        host = socket.gethostname()
        line = (
            f"rank {self.rank} on {host} hung: no progress for {idle:.0f} s during {self.phase} "
            f"(hang timeout {self.timeout:.0f} s, train.hang_timeout_s)"
        )
        # The stacks first: a peer that fires a moment sooner ends the job, and this rank's stacks are the evidence
        # of what it was doing; asking the store about the peers takes a round trip or more.
        log = write_stacks(self.run_dir, f"rank {self.rank} pid {os.getpid()} on {host}: {line}")
        peers, lost = self.heartbeat.report()
        line += peers
        lost_field = {"lost": lost, "lost_named": name_ranks(lost, self.heartbeat.peers)} if lost else {}
        append_from_any_rank(
            self.run_dir,
            "hang",
            self.step,
            rank=self.rank,
            host=host,
            phase=self.phase,
            seconds=round(idle, 1),
            **lost_field,
        )
        failures.exit_with(line + (f"; stacks of every thread in {log}" if log else ""), failures.EXIT_FAILURE)


def thread_stacks() -> str:
    """Every thread's Python stack, each under its thread's name (the training thread, the writer, loaders)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f"Thread {names.get(ident, '?')} ({ident}):\n{''.join(traceback.format_stack(frame))}")
    return "\n".join(parts)


def write_stacks(run_dir: Path, header: str) -> Path | None:
    """Append `header` and every thread's stack to the run directory's failures.log; its path, or None when it
    cannot be written (the line still reaches the user)."""
    log = RunFiles(run_dir).failures
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"--- {stamp} {header}\n{thread_stacks()}\n")
    except OSError:
        return None
    return log


def stall_due(run_dir: Path, stall_at: int | None, stall_rank: int, rank: int, step: int) -> bool:
    """`+debug.stall_at=STEP` on `+debug.stall_rank`: whether this rank stalls before `step`, once in the run's
    life (a `stall_injected` line in the journal: the relaunch after the hang does not stall again)."""
    if stall_at is None or step != stall_at or rank != stall_rank:
        return False
    path = RunFiles(run_dir).journal
    done = path.exists() and any(e["event"] == "stall_injected" and e["step"] == step for e in read_journal(path))
    return not done


def stall_forever(run_dir: Path, watchdog: Watchdog, step: int) -> None:
    """Stop making progress, as a wedged rank does: journaled first, then the training thread sleeps until this
    rank's watchdog (or a peer's end) stops the process."""
    watchdog.beat(step - 1, f"a stall by +debug.stall_at={step} before step {step}", measure=False)
    append_from_any_rank(run_dir, "stall_injected", step, rank=watchdog.rank, reason="+debug.stall_at")
    while True:
        time.sleep(3600)
