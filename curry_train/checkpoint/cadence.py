"""Cadence arithmetic: where a crash or a spike at a step leaves the run (the worst-case resume point), the
Young/Daly interval between exact-resume saves that minimises the time lost to saves and recomputation, and the
interval `checkpoint.*_every=auto` chooses from it. Pure: no torch, no files.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from curry_train.checkpoint.policy import Checkpoint, Policy, Role, by_policy, exact_resume_points, rollback_target

if TYPE_CHECKING:  # config imports Hydra; this module stays importable by `status` without it
    from curry_train.config import Config

# ------------------------------------------------------------------------------------- worst-case resume point


@dataclass(frozen=True)
class ResumeTarget:
    at_step: int
    step: int  # 0: no checkpoint, the run starts again from scratch
    relpath: str | None
    fallback_step: int | None = None  # async saves: where a crash lands if the newest save was still being written

    @property
    def steps_lost(self) -> int:
        return self.at_step - self.step


def checkpoints_before(policy: Policy, step: int) -> list[Checkpoint]:
    """Rollback and recovery checkpoints on disk just before the saves due at ``step``: each role's newest keep."""
    on_disk = []
    for role, every, keep in (
        (Role.ROLLBACK, policy.rollback_every, policy.rollback_keep),
        (Role.RECOVERY, policy.recovery_every, policy.recovery_keep),
    ):
        if every > 0:
            newest = (step - 1) // every * every
            on_disk += [Checkpoint(role, s) for s in range(newest, 0, -every)[:keep]]
    return on_disk


def crash_target(policy: Policy, step: int, async_save: bool = False) -> ResumeTarget:
    """Worst case for a crash at ``step``: the save due at ``step`` never commits, so the newest one before it.
    The newest exact-resume save always survives retention (a role that saves keeps at least one); none yet (or a
    policy that writes none): step 0, the run starts again from scratch."""
    if step < 0:
        raise ValueError(f"crash step={step}: must be >= 0")
    candidates = exact_resume_points(checkpoints_before(policy, step), by_policy(policy))
    if not candidates:
        return ResumeTarget(step, 0, None)
    newest = candidates[0]
    # The save before the newest one: a rollback hard-linked to a recovery of the same step is the same save.
    fallback = next((c.step for c in candidates if c.step < newest.step), 0) if async_save else None
    return ResumeTarget(step, newest.step, newest.relpath, fallback)


def spike_distance(cfg: Config) -> int:
    """How far before a spike an automatic rollback lands at least (a manual one: the step before)."""
    return cfg.spike.window + cfg.spike.rollback_margin if cfg.spike.enabled else 1


def spike_target(policy: Policy, step: int, before_window: int = 1) -> ResumeTarget:
    """A loss spike seen after ``step``: roll back to the newest rollback or recovery checkpoint at least
    ``before_window`` steps before it (automatic detection: the baseline window plus its margin)."""
    target = rollback_target(checkpoints_before(policy, step), step - before_window)
    return ResumeTarget(step, 0, None) if target is None else ResumeTarget(step, target.step, target.relpath)


# ----------------------------------------------------------------------------------------- Young/Daly cadence


def young_interval(save_seconds: float, mtbf_seconds: float) -> float:
    """Young (1974): the compute time between checkpoints that minimises expected waste, sqrt(2 C M)."""
    return math.sqrt(2 * save_seconds * mtbf_seconds)


def daly_interval(save_seconds: float, mtbf_seconds: float) -> float:
    """Daly (2006), higher order: sqrt(2CM) (1 + sqrt(C/2M)/3 + (C/2M)/9) - C for C < 2M, else M."""
    c, m = save_seconds, mtbf_seconds
    if c >= 2 * m:
        return m
    ratio = c / (2 * m)
    return math.sqrt(2 * c * m) * (1 + math.sqrt(ratio) / 3 + ratio / 9) - c


def wasted_fraction(interval_seconds: float, save_seconds: float, mtbf_seconds: float) -> float:
    """First-order share of time lost with a save every ``interval_seconds`` of compute.

    C / T for saving, plus (T + C) / 2M for recomputation: each failure (one per M seconds) loses on average half
    of an interval and its save.
    """
    t, c, m = interval_seconds, save_seconds, mtbf_seconds
    return c / t + (t + c) / (2 * m)


@dataclass(frozen=True)
class Timing:
    save_seconds: float | None
    save_source: str
    step_seconds: float | None
    step_source: str
    mtbf_seconds: float
    mtbf_source: str
    interruptions: int = 0  # the run's own failures the MTBF counts, over training_seconds
    training_seconds: float = 0.0
    mtbf_prior_seconds: float | None = None


@dataclass(frozen=True)
class Cadence:
    young_seconds: float
    daly_seconds: float
    optimum_steps: int
    configured_steps: int | None  # the exact-resume cadence of the config (None: no role saves full state)
    configured_role: str | None  # the role whose cadence that is
    wasted_configured: float | None
    wasted_optimum: float


def exact_resume_cadence(policy: Policy) -> tuple[int, str] | None:
    """The smallest cadence of a role that saves full state, and that role: the interval Young/Daly is about."""
    cadences = [(policy.recovery_every, Role.RECOVERY.value)]
    if policy.full_rollback:
        cadences.append((policy.rollback_every, Role.ROLLBACK.value))
    enabled = [c for c in cadences if c[0] > 0]
    return min(enabled) if enabled else None


def cadence(policy: Policy, timing: Timing) -> Cadence | None:
    """Young/Daly optimum in steps and the waste at the configured cadence versus the optimum."""
    c, step, m = timing.save_seconds, timing.step_seconds, timing.mtbf_seconds
    if c is None or step is None or c <= 0 or step <= 0:
        return None
    daly = daly_interval(c, m)
    configured = exact_resume_cadence(policy)
    return Cadence(
        young_seconds=young_interval(c, m),
        daly_seconds=daly,
        optimum_steps=max(1, round(daly / step)),
        configured_steps=configured[0] if configured else None,
        configured_role=configured[1] if configured else None,
        wasted_configured=wasted_fraction(configured[0] * step, c, m) if configured else None,
        wasted_optimum=wasted_fraction(daly, c, m),
    )


# ------------------------------------------------------------------------------------- the automatic interval


def mtbf_estimate(prior_seconds: float, training_seconds: float, interruptions: int) -> float:
    """The mean time between failures from a prior and the run's own history: (prior + T) / (1 + n).

    The posterior mean of an exponential failure time whose prior counts as one failure in ``prior_seconds``: with
    no history it is the prior, a run that trains long without failing raises it, and each interruption (a crash,
    a kill, a preemption, a hang) in ``training_seconds`` of training lowers it."""
    return (prior_seconds + max(0.0, training_seconds)) / (1 + max(0, interruptions))


class Clamp(enum.StrEnum):
    """Which bound decided an automatic interval instead of Daly's optimum."""

    MIN = "min"  # checkpoint.auto_min_every (also: no save or step time measured yet, so the first save comes early)
    MAX = "max"  # checkpoint.auto_max_every (default: the run's length)
    OVERHEAD = "overhead"  # checkpoint.max_overhead: saves may cost at most this fraction of training time


@dataclass(frozen=True)
class AutoBounds:
    min_every: int
    max_every: int
    max_overhead: float  # a fraction of training time


@dataclass(frozen=True)
class AutoInterval:
    every: int
    optimum_steps: float | None  # Daly's interval in steps before any bound (None: an input is not measured yet)
    clamped: Clamp | None


def auto_interval(
    save_seconds: float | None, step_seconds: float | None, mtbf_seconds: float, bounds: AutoBounds
) -> AutoInterval:
    """The interval in steps between exact-resume saves: Daly's optimum over the step time, within the bounds.

    At least ``min_every``, and at least enough steps that a save every that many costs no more than
    ``max_overhead`` of training time (C / (every x step) <= max_overhead); never more than ``max_every``, which
    wins over both. Without a measured save cost or step time: ``min_every``, so that the first save comes early
    and is measured."""
    if save_seconds is None or step_seconds is None or save_seconds <= 0 or step_seconds <= 0:
        return AutoInterval(min(bounds.min_every, bounds.max_every), None, Clamp.MIN)
    optimum = daly_interval(save_seconds, mtbf_seconds) / step_seconds
    every = max(1, round(optimum))
    for_overhead = math.ceil(save_seconds / (bounds.max_overhead * step_seconds) - 1e-9)
    lower, lower_kind = max((bounds.min_every, Clamp.MIN), (for_overhead, Clamp.OVERHEAD), key=lambda b: b[0])
    if every > bounds.max_every or lower > bounds.max_every:
        return AutoInterval(bounds.max_every, optimum, Clamp.MAX)
    if every < lower:
        return AutoInterval(lower, optimum, lower_kind)
    return AutoInterval(every, optimum, None)


def optimum_moved(before: float | None, after: float | None, tolerance: float = 0.2) -> bool:
    """Whether a new optimum differs from the one in force by more than ``tolerance`` (a first measurement always
    does): a new decision is worth making and journaling then, not after every save's noise."""
    if after is None:
        return False
    return before is None or abs(after - before) > tolerance * before


def with_interval(policy: Policy, roles: tuple[Role, ...], every: int) -> Policy:
    """``policy`` with the cadence of ``roles`` set to ``every``: how an automatic decision takes effect (saves due,
    retention and best-K go on working from the policy as before)."""
    return dataclasses.replace(policy, **{f"{Role(role).value}_every": every for role in roles})
