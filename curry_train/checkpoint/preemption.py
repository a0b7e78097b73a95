"""Preemption: a scheduler's warning signal makes the run finish its step, save a full checkpoint and stop."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from curry_train import failures
from curry_train.checkpoint.checkpointer import Checkpointer
from curry_train.checkpoint.policy import Contents, Policy, SaveReason, decide_save
from curry_train.history import save_costs
from curry_train.journal import append_from_any_rank


class StopNow(KeyboardInterrupt):
    """A second stop signal: stop at once, without the save the first one asked for."""


class Preemption:
    """SIGTERM (what schedulers and torchrun send before killing), SIGUSR1 (SLURM's `--signal` warning) and SIGINT
    (Ctrl-C) ask the run to finish its step, save a full checkpoint and stop, instead of dying mid-step. A second
    signal stops at once: the last committed checkpoint is intact, a save cut short is never visible.

    Rank 0 says at once what the first signal will do, and journals the second (`preempt` with `forced`) before
    stopping, so that `curry-train status` tells what stopped the attempt. `where` gives the last completed step
    and what the rank is doing (the watchdog's phase, e.g. "the save of step 12")."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    # One signal can arrive twice within milliseconds: SLURM signals every process of a step, workers included, and
    # `curry-train run` passes the same signal on. A repeat of the same signal this soon, before the save it asked
    # for has begun, is that one signal; once the save runs, a repeat means "stop now".
    REPEAT_WINDOW_S = 1.0
    ANNOUNCE_AFTER_S = 0.5

    def __init__(
        self,
        run_dir: Path | None = None,
        is_main: bool = False,
        where: Callable[[], tuple[int, str]] = lambda: (0, "the current step"),
        plan_save_seconds: float | None = None,
    ) -> None:
        self.received: int | None = None
        self.received_at = 0.0
        self.saving = False  # the save the first signal asked for has begun
        self.settled = False  # nothing is left to save: see settle()
        self._announcement: str | None = None  # rank 0's line about the first signal, until said
        self._announcing = threading.RLock()
        self._timer: threading.Timer | None = None  # re-entrant: a signal handler may interrupt the one holding it
        self.run_dir, self.is_main, self.where, self.plan_save_seconds = run_dir, is_main, where, plan_save_seconds
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: object) -> None:
        if self.settled:
            return
        name = signal.Signals(signum).name
        step, phase = self.where()
        repeat = self.received == signum and time.monotonic() - self.received_at < self.REPEAT_WINDOW_S
        if repeat and not self.saving:
            return
        if self.received is not None:
            self._announce()  # the first signal's line, if its moment has not come yet: then what stopped it
            self.uninstall()
            if self.is_main and self.run_dir is not None:
                append_from_any_rank(self.run_dir, "preempt", step, signal=name, forced=True, during=phase)
            first = signal.Signals(self.received).name
            what = f"{name} received twice" if name == first else f"{name} received after {first}"
            raise StopNow(f"{what}: stopped at once during {phase}")
        self.received, self.received_at = signum, time.monotonic()
        if self.is_main:
            # A full save's wall time until committed, as the last one took (the journal), else the plan's.
            taken = save_costs(self.run_dir, async_save=False) if self.run_dir is not None else []
            seconds = (taken[-1] if taken else None) or self.plan_save_seconds
            about = f"about {seconds:.0f} s" if seconds is not None else "no save measured yet"
            line = (
                f"curry-train: {name} received: finishing {phase}, then saving a full checkpoint ({about}) and "
                "stopping; a second signal stops at once without that save\n"
            )
            # Said from a thread a moment later, unless this rank is by then ending on a failure: torchrun sends
            # SIGTERM to the surviving workers when one fails, and their one line is that failure, not a save that
            # will not happen. (os.write, not print: the training thread may be inside a print.)
            self._announcement = line
            self._timer = threading.Timer(self.ANNOUNCE_AFTER_S, self._announce)
            self._timer.daemon = True
            self._timer.start()

    def _announce(self) -> None:
        """Say what the first signal will do, once (from the timer, or before a second signal stops the run)."""
        with self._announcing:
            line, self._announcement = self._announcement, None
        if line is not None and not failures.ending.is_set():
            os.write(2, line.encode())

    @property
    def requested(self) -> bool:
        return self.received is not None

    def settle(self) -> None:
        """Nothing is left to save and the launch is about to end on its own: a stop signal from now on is ignored.
        (Restoring the default handlers instead would let a late second signal kill a launch that has already
        saved, journaled its end and recorded status 0, and turn it into a failure.) The announcement's timer is
        ended here too: a daemon thread that wakes while the interpreter shuts down aborts the process."""
        self.settled = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join(timeout=5)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals() -> None:
    """For a launch that has nothing left to do but exit 0: stop signals are ignored until it has."""
    for sig in Preemption.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def ensure_full_save(
    checkpointer: Checkpointer,
    policy: Policy,
    step: int,
    state: Callable[[Contents], dict],
    reason: SaveReason = SaveReason.PREEMPTION,
) -> bool:
    """A full checkpoint of `step`, unless the cadence already saved one (in flight or committed: then finishing it
    is enough). Returns whether this made a save the cadence would not have."""
    decision = decide_save(policy, step, reason)
    if decision is not None:
        checkpointer.save(step, list(decision.roles), decision.contents, state(decision.contents))
    return decision is not None


def save_on_preemption(
    checkpointer: Checkpointer,
    policy: Policy,
    step: int,
    state: Callable[[Contents], dict],
    preemption: Preemption,
    tell_user: Callable[[str], None],
) -> None:
    """Make sure an exact-resume checkpoint of `step` exists, journal the preemption, and say how to go on."""
    preemption.saving = True
    extra = ensure_full_save(checkpointer, policy, step, state)
    checkpointer.wait()
    name = signal.Signals(preemption.received).name if preemption.received else "a signal on another rank"
    # extra_save: a checkpoint that exists only because the run was stopped here; spike rollbacks pass it by.
    checkpointer.journal.append("preempt", step, signal=name, extra_save=extra)
    tell_user(f"curry-train: {name} received: saved step {step} and stopped; continue with +resume=latest")
