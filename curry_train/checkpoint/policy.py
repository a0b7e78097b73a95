"""Checkpoint policy: which roles are due, what to keep, what to delete. Pure logic, stdlib only.

Names on disk: rollback and recovery checkpoints are ``step-00000500.dcp``; best-K checkpoints are
``dev-loss-2.341-step-00000450.dcp``, the metric written as ``repr(float)``: the shortest spelling that parses
back to the same float, so names stay readable and round-trip exactly (``1e-05``, ``-0.5``). A fixed format
such as ``.4f`` would merge distinct values and change the ranking read back from disk.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass


class Role(enum.StrEnum):
    """What a checkpoint is for. StrEnum so that f-strings print the value, not ``Role.ROLLBACK``."""

    ROLLBACK = "rollback"
    RECOVERY = "recovery"
    BEST_K = "best_k"

    @property
    def dirname(self) -> str:
        """The directory under the run dir that holds this role's checkpoints."""
        return "best-k" if self is Role.BEST_K else self.value


class Direction(enum.StrEnum):
    """Whether a smaller or a larger best-K metric is better."""

    MINIMIZE = "minimize"
    MAXIMIZE = "maximize"


class Contents(enum.StrEnum):
    """What a checkpoint holds (`checkpoint.rollback_contents` chooses it for the rollback role)."""

    FULL = "full"  # everything that decides the next step (parameters, optimizer, RNG, data position): exact resume
    PARAMS = "params"  # parameters (and the step they belong to) only: enough to roll back, not to resume


class SaveReason(enum.StrEnum):
    """Why a save is considered at a step; `decide_save` turns it into roles and contents."""

    CADENCE = "cadence"  # the roles whose cadence falls on the step
    FINAL = "final"  # the run's last step: `run_end` must name an exact-resume checkpoint
    PREEMPTION = "preemption"  # a stop signal: the requeued run must resume exactly
    RESAVE = "resave"  # a rollback saves its target step again, with the data position that skips the spike


# No leading, trailing or doubled '_': the name becomes '-'-separated and must parse back unambiguously.
_METRIC_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*")
_STEP_NAME_RE = re.compile(r"step-(\d{8,})\.dcp")
_BEST_NAME_RE = re.compile(
    r"([A-Za-z][A-Za-z0-9]*(?:-[A-Za-z0-9]+)*?)"  # lazy, so a negative value keeps its '-'
    r"-(-?\d+(?:\.\d+)?(?:e[+-]\d+)?)-step-(\d{8,})\.dcp"
)
_RETENTION_KEYS = {"rollback_keep", "recovery_keep", "abandoned_keep"}


def _key(field_name: str) -> str:
    """The config key users type for a Policy field."""
    group = "checkpoint.retention" if field_name in _RETENTION_KEYS else "checkpoint"
    return f"{group}.{field_name}"


def _check_metric_name(key: str, name: object) -> None:
    if not isinstance(name, str) or not _METRIC_RE.fullmatch(name):
        raise ValueError(
            f"{key}={name!r}: use letters, digits and single '_' between them, starting with a "
            "letter (the name becomes part of a directory name)"
        )


@dataclass(frozen=True)
class Policy:
    """The checkpoint block of the config. A cadence (or best_k) of 0 disables that role."""

    rollback_every: int = 100
    recovery_every: int = 1000
    best_k: int = 3
    best_k_metric: str = "dev_loss"
    best_k_direction: Direction = Direction.MINIMIZE
    rollback_keep: int = 5
    recovery_keep: int = 3
    rollback_contents: Contents = Contents.FULL
    abandoned_keep: int = 1  # checkpoints set aside by rollbacks that are kept (the newest set aside)

    def __post_init__(self) -> None:
        for name in ("rollback_every", "recovery_every", "best_k", "rollback_keep", "recovery_keep", "abandoned_keep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{_key(name)}={value!r}: must be an integer >= 0")
        for every, keep in (("rollback_every", "rollback_keep"), ("recovery_every", "recovery_keep")):
            if getattr(self, every) > 0 and getattr(self, keep) == 0:
                raise ValueError(
                    f"{_key(keep)}=0 with {every}={getattr(self, every)}: a role that saves "
                    f"must keep at least 1 checkpoint; set {_key(every)}=0 to disable the role"
                )
        _check_metric_name(_key("best_k_metric"), self.best_k_metric)
        for name, enum_type in (("best_k_direction", Direction), ("rollback_contents", Contents)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum_type(value))
            except ValueError:
                allowed = ", ".join(repr(member.value) for member in enum_type)
                raise ValueError(f"{_key(name)}={value!r}: allowed values are {allowed}") from None

    @property
    def full_rollback(self) -> bool:
        """Rollback checkpoints hold full state, so they are exact-resume points too."""
        return self.rollback_contents is Contents.FULL


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint, identified by role, step and (best_k only) its metric."""

    role: Role
    step: int
    metric: float | None = None
    metric_name: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role(self.role))
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise ValueError(f"checkpoint step={self.step!r}: must be an integer >= 0")
        if self.role is not Role.BEST_K:
            if self.metric is not None or self.metric_name is not None:
                raise ValueError(f"a {self.role.value} checkpoint carries no metric")
            return
        if self.metric is None or not math.isfinite(self.metric):
            raise ValueError(f"a best_k checkpoint needs a finite metric, got {self.metric!r}")
        _check_metric_name("best_k checkpoint metric_name", self.metric_name)
        # An int metric would be spelled "2" instead of "2.0" and not parse back to the same name.
        object.__setattr__(self, "metric", float(self.metric))

    @property
    def name(self) -> str:
        if self.role is Role.BEST_K:
            assert self.metric_name is not None
            return f"{self.metric_name.replace('_', '-')}-{self.metric!r}-step-{self.step:08d}.dcp"
        return f"step-{self.step:08d}.dcp"

    @property
    def relpath(self) -> str:
        return f"{self.role.dirname}/{self.name}"


def parse_checkpoint_name(role: Role, name: str) -> Checkpoint | None:
    """The inverse of ``Checkpoint.name``; None for temporary, foreign or non-canonical names."""
    role = Role(role)
    try:
        if role is Role.BEST_K:
            match = _BEST_NAME_RE.fullmatch(name)
            if match is None:
                return None
            checkpoint = Checkpoint(role, int(match[3]), float(match[2]), match[1].replace("-", "_"))
        else:
            match = _STEP_NAME_RE.fullmatch(name)
            if match is None:
                return None
            checkpoint = Checkpoint(role, int(match[1]))
    except ValueError:  # e.g. a value that overflows to inf
        return None
    # Only the canonical spelling counts, so "2.3410" or a 9-digit zero-padded step is not a second name.
    return checkpoint if checkpoint.name == name else None


def roles_due(policy: Policy, step: int) -> list[Role]:
    """Rollback and/or recovery, in that order, due after ``step`` completed steps. Never best_k."""
    if step <= 0:  # nothing trained yet
        return []
    cadences = ((Role.ROLLBACK, policy.rollback_every), (Role.RECOVERY, policy.recovery_every))
    return [role for role, every in cadences if every > 0 and step % every == 0]


@dataclass(frozen=True)
class SaveDecision:
    """One save: its bytes are written for the first role and linked for the others."""

    roles: tuple[Role, ...]
    contents: Contents


def contents_of(policy: Policy, roles: tuple[Role, ...] | list[Role]) -> Contents:
    """What a save for `roles` holds: full state when any of them is an exact-resume role."""
    if Role.RECOVERY in roles or (Role.ROLLBACK in roles and policy.full_rollback):
        return Contents.FULL
    return Contents.PARAMS


def largest_save(policy: Policy) -> Contents | None:
    """What the largest save the cadence makes holds (None: it saves nothing): what staging is prepared for."""
    cadence = {Role.ROLLBACK: policy.rollback_every, Role.RECOVERY: policy.recovery_every}
    roles = [role for role, every in cadence.items() if every]
    if roles:
        return contents_of(policy, roles)
    return Contents.PARAMS if policy.best_k else None


def decide_save(
    policy: Policy, step: int, reason: SaveReason, roles_at_step: tuple[Role, ...] = ()
) -> SaveDecision | None:
    """What to save after `step` completed steps, and why; None when nothing is to be saved.

    CADENCE: the roles due. FINAL and PREEMPTION: a full checkpoint, unless the cadence saves one at this step
    anyway (then finishing that save is enough); it goes under recovery, or under rollback when only a full
    rollback role saves, so that retention deletes it in due course. RESAVE: `roles_at_step`, the roles a rollback's
    target step was committed under, again. Best-K is never decided here: it follows the dev metric."""
    reason = SaveReason(reason)
    if reason is SaveReason.RESAVE:
        roles = tuple(r for r in roles_at_step if r is not Role.BEST_K)
        return SaveDecision(roles, contents_of(policy, roles)) if roles else None
    due = tuple(roles_due(policy, step))
    cadence = SaveDecision(due, contents_of(policy, due)) if due else None
    if reason is SaveReason.CADENCE:
        return cadence
    if cadence is not None and cadence.contents is Contents.FULL:
        return None
    only_rollback = policy.full_rollback and policy.rollback_every > 0 and policy.recovery_every == 0
    return SaveDecision((Role.ROLLBACK if only_rollback else Role.RECOVERY,), Contents.FULL)


def is_better(direction: Direction, a: float, b: float) -> bool:
    """True if ``a`` is strictly better than ``b``; NaN is never better."""
    return a < b if Direction(direction) is Direction.MINIMIZE else a > b


def _metric(checkpoint: Checkpoint) -> float:
    assert checkpoint.metric is not None  # every BEST_K checkpoint has one (Checkpoint.__post_init__)
    return checkpoint.metric


def rank_best_k(policy: Policy, existing: list[Checkpoint]) -> list[Checkpoint]:
    """Best-K checkpoints of the policy's metric, best first; equal values rank by earlier step."""
    sign = 1.0 if policy.best_k_direction is Direction.MINIMIZE else -1.0
    mine = [c for c in dict.fromkeys(existing) if c.role is Role.BEST_K and c.metric_name == policy.best_k_metric]
    return sorted(mine, key=lambda c: (sign * _metric(c), c.step))


@dataclass(frozen=True)
class BestKDecision:
    admit: bool
    evict: list[Checkpoint]
    reason: str


def best_k_decision(policy: Policy, existing: list[Checkpoint], step: int, value: float) -> BestKDecision:
    """Whether a dev result at ``step`` enters the top K, and which best-K checkpoints it pushes out."""
    label = f"{policy.best_k_metric}={value!r} at step {step}"
    k = policy.best_k
    if k == 0:
        return BestKDecision(False, [], "best_k=0: the role is disabled")
    if not math.isfinite(value):
        return BestKDecision(False, [], f"{label} is not finite")
    ranked = rank_best_k(policy, existing)
    # Existing checkpoints win ties: the candidate goes after everything at least as good as it.
    position = sum(1 for c in ranked if not is_better(policy.best_k_direction, value, _metric(c)))
    if position >= k:
        return BestKDecision(False, [], f"{label} does not beat #{k} ({ranked[k - 1].metric!r})")
    return BestKDecision(True, ranked[k - 1 :], f"{label} ranks #{position + 1} of best_k={k}")


def best_k_value(value: float) -> float:
    """A dev result as best-K ranks and names it: six significant digits keep the name readable
    (dev-loss-2.34102-step-...) at any scale of the metric; values equal to that precision tie."""
    return float(f"{value:.6g}")


@dataclass(frozen=True)
class Admission:
    """A dev result that enters the top K: the checkpoint to save, those it pushes out, and why."""

    checkpoint: Checkpoint
    evict: list[Checkpoint]
    reason: str


class BestK:
    """A run's best-K ranking as dev results come in. Every rank holds one, starting from the same listing and fed
    the same values, so ranks agree on each admission without talking."""

    def __init__(self, policy: Policy, committed: list[Checkpoint]) -> None:
        self.policy = policy
        self.checkpoints = list(committed)

    def admit(self, step: int, value: float) -> Admission | None:
        """The checkpoint a dev result at `step` becomes when it ranks in the top best_k (then counted in the
        ranking), else None. A tie keeps the earlier checkpoint (`best_k_decision`)."""
        if self.policy.best_k == 0:
            return None
        value = best_k_value(value)
        if any(c.step == step and c.metric == value for c in self.checkpoints):
            # A resumed run evaluating the same step again. (The same step with another value is a new trajectory
            # after a rollback: it competes like any other.)
            return None
        decision = best_k_decision(self.policy, self.checkpoints, step, value)
        if not decision.admit:
            return None
        checkpoint = Checkpoint(Role.BEST_K, step, metric=value, metric_name=self.policy.best_k_metric)
        self.checkpoints = [c for c in self.checkpoints if c not in decision.evict] + [checkpoint]
        return Admission(checkpoint, decision.evict, decision.reason)


@dataclass(frozen=True)
class Deletion:
    checkpoint: Checkpoint
    reason: str


def retention(
    policy: Policy, committed: list[Checkpoint], protected: set[str] | frozenset[str] = frozenset()
) -> list[Deletion]:
    """Checkpoints to delete, oldest (or worst) first.

    Rollback and recovery keep their newest ``*_keep`` by step. A checkpoint whose relpath is in ``protected``
    (the ``latest`` target) is never deleted: inside the newest ``keep`` it takes one of the slots; outside
    it is kept in addition, so a role may hold ``keep + 1`` until ``latest`` moves on. A newer checkpoint is
    never dropped to make room for it. Best-K keeps the top ``best_k`` of its metric.
    A disabled role (cadence or best_k 0), and best-K checkpoints of another metric, are left alone: they were
    written by an earlier launch with another config, and deleting is the one thing that cannot be undone.
    """
    unique = list(dict.fromkeys(committed))
    deletions: list[Deletion] = []
    for role, every, keep in (
        (Role.ROLLBACK, policy.rollback_every, policy.rollback_keep),
        (Role.RECOVERY, policy.recovery_every, policy.recovery_keep),
    ):
        if every == 0:
            continue
        newest_first = sorted((c for c in unique if c.role is role), key=lambda c: c.step, reverse=True)
        deletions += [
            Deletion(c, f"{role.value} keep={keep} exceeded")
            for c in reversed(newest_first[keep:])
            if c.relpath not in protected
        ]
    if policy.best_k > 0:
        ranked = rank_best_k(policy, unique)
        deletions += [
            Deletion(c, f"best_k={policy.best_k} exceeded: {policy.best_k_metric}={c.metric!r} ranks #{rank}")
            for rank, c in enumerate(ranked, start=1)
            if rank > policy.best_k and c.relpath not in protected
        ][::-1]
    return deletions


def exact_resume_points(committed: Iterable[Checkpoint], holds_full: Callable[[Checkpoint], bool]) -> list[Checkpoint]:
    """The checkpoints a run can resume from exactly, newest first, recovery first among equal steps: the rollback
    and recovery checkpoints that hold full state. `holds_full` says which: what their manifests record (a run
    directory) or what the policy saves (planning, `by_policy`); it is asked of rollback and recovery only, so a
    run directory's best-K manifests are never read."""
    candidates = [c for c in dict.fromkeys(committed) if c.role is not Role.BEST_K and holds_full(c)]
    return sorted(candidates, key=lambda c: (-c.step, c.role is not Role.RECOVERY))


def by_policy(policy: Policy) -> Callable[[Checkpoint], bool]:
    """`holds_full` for checkpoints the policy would write: recovery, and rollback when it holds full state."""
    return lambda checkpoint: contents_of(policy, (checkpoint.role,)) is Contents.FULL


def rollback_target(
    committed: list[Checkpoint], at_or_before: int, passed_by: frozenset[int] = frozenset()
) -> Checkpoint | None:
    """The newest rollback or recovery checkpoint at a step <= ``at_or_before``; recovery wins a tie.

    Every rollback checkpoint holds parameters whatever ``rollback_contents`` says, so either contents will do.
    Best-K is never a target: it is chosen by a dev metric, not by recency, and may lie far behind the spike.
    Checkpoints at the steps in ``passed_by`` are not targets either: an automatic rollback passes by the saves a
    preemption added, which exist only because the run was stopped there, so that where it rolls back (and which
    samples it skips) is the same as in a run that was never stopped.
    """
    candidates = [
        c
        for c in committed
        if c.role in (Role.ROLLBACK, Role.RECOVERY) and c.step <= at_or_before and c.step not in passed_by
    ]
    return max(candidates, key=lambda c: (c.step, c.role is Role.RECOVERY), default=None)


def abandoned_by_rollback(committed: list[Checkpoint], step: int) -> list[Checkpoint]:
    """What a rollback to ``step`` sets aside, newest first: the rollback and recovery checkpoints after it (the
    abandoned trajectory). Best-K checkpoints stay: each is a real measurement of real parameters, and they keep
    competing in the ranking (a step of the new trajectory enters when it scores better)."""
    newer = [c for c in dict.fromkeys(committed) if c.role is not Role.BEST_K and c.step > step]
    return sorted(newer, key=lambda c: (c.step, c.role is Role.RECOVERY), reverse=True)


def skipped_range(target_cursor: int, spike_cursor: int, extra_steps: int, batch_size: int) -> tuple[int, int]:
    """The global samples a rollback skips: those the abandoned steps consumed (from the target's sample cursor to
    the cursor after the spike step) and ``extra_steps`` more batches. A rollback resumes at the end of it."""
    if not 0 <= target_cursor <= spike_cursor:
        raise ValueError(f"sample cursors out of order: target {target_cursor}, spike {spike_cursor}")
    return target_cursor, spike_cursor + extra_steps * batch_size
