"""Preemption: a scheduler's warning signal makes the run finish its step, save a full checkpoint and stop."""

from __future__ import annotations

import signal
from collections.abc import Callable

from curry_train.checkpoint.checkpointer import Checkpointer
from curry_train.checkpoint.policy import Contents, Policy, SaveReason, decide_save


class StopNow(KeyboardInterrupt):
    """A second stop signal: stop at once, without the save the first one asked for."""


class Preemption:
    """SIGTERM (what schedulers and torchrun send before killing), SIGUSR1 (SLURM's `--signal` warning) and SIGINT
    (Ctrl-C) ask the run to finish its step, save a full checkpoint and stop, instead of dying mid-step. A second
    signal stops at once: the last committed checkpoint is intact, a save cut short is never visible."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            self.uninstall()
            raise StopNow(f"{signal.Signals(signum).name} received twice: stopped at once")
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def ensure_full_save(
    ckpt: Checkpointer,
    policy: Policy,
    step: int,
    state: Callable[[Contents], dict],
    reason: SaveReason = SaveReason.PREEMPTION,
) -> None:
    """A full checkpoint of `step`, unless the cadence already saved one (in flight or committed: then finishing it
    is enough)."""
    decision = decide_save(policy, step, reason)
    if decision is not None:
        ckpt.save(step, list(decision.roles), decision.contents, state(decision.contents))


def save_on_preemption(
    ckpt: Checkpointer,
    policy: Policy,
    step: int,
    state: Callable[[Contents], dict],
    preemption: Preemption,
    say: Callable[[str], None],
) -> None:
    """Make sure an exact-resume checkpoint of `step` exists, journal the preemption, and say how to go on."""
    ensure_full_save(ckpt, policy, step, state)
    ckpt.wait()
    name = signal.Signals(preemption.received).name if preemption.received else "a signal on another rank"
    ckpt.journal.append("preempt", step, signal=name)
    say(f"curry-train: {name} received: saved step {step} and stopped; continue with +resume=latest")
