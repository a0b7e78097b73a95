"""Carrying out a rollback: after a loss spike seen in the loop, or at launch by request (`+rollback_to`).

The decisions are pure (`policy.rollback_target`, `policy.abandoned_by_rollback`, `policy.skipped_range`,
`spike.rollback_bound`, `spike.recent_rollbacks`); this module applies them to the model, the optimizer, the
progress counters and the run directory, which rank 0 alone changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curry_train.checkpoint.checkpointer import Checkpointer
from curry_train.checkpoint.policy import (
    Role,
    SaveReason,
    abandoned_by_rollback,
    decide_save,
    rollback_target,
    skipped_range,
)
from curry_train.checkpoint.resume import ResumePoint, load, point_of
from curry_train.checkpoint.state import Contents, Progress, TrainState
from curry_train.checkpoint.store import RunDir
from curry_train.config import SpikeConfig
from curry_train.distributed import on_rank0
from curry_train.journal import read_journal
from curry_train.metrics import read_metrics
from curry_train.spike import Verdict, recent_rollbacks, rollback_bound


class SpikeError(RuntimeError):
    """A loss spike the run cannot roll back from (no checkpoint early enough, or too many rollbacks): exit 3."""


@dataclass(frozen=True)
class Cause:
    """Why a run rolls back: where the abandoned trajectory reached, and what was seen there."""

    step: int  # the abandoned trajectory's last completed step (the spike step)
    cursor: int  # the global sample cursor after that step
    fields: dict[str, Any]  # journaled as they are (loss, baseline, threshold, request, ...)
    summary: str  # said on the console


def roll_back(
    point: ResumePoint,
    cause: Cause,
    checkpointer: Checkpointer,
    train_state: TrainState,
    spike: SpikeConfig,
    batch_size: int,
    world_size: int,
    tell_user: Callable[[str], None],
) -> None:
    """Return this run to the checkpoint at `point`, skip the abandoned steps' samples, and make that durable.

    The same for an automatic rollback (a spike seen in process) and a manual one (`+rollback_to`). Afterwards the
    abandoned rollback and recovery checkpoints are set aside (crash-safely, newest first, then `latest` moves),
    and the target step is saved again with the new data position, so a crash from here resumes the new trajectory.
    """
    checkpointer.wait()
    history, injected = list(train_state.progress.rollbacks), list(train_state.progress.injected)
    load(point, checkpointer, train_state, world_size)
    progress = train_state.progress
    start, end = skipped_range(progress.cursor, cause.cursor, spike.skip_extra_steps, batch_size)
    if end > start:
        progress.skipped = [*progress.skipped, [start, end]]
    progress.cursor = end
    # The run's history is not rewound: what this process saw, and what the checkpoint recorded (at launch, the
    # process has seen nothing yet).
    progress.rollbacks = [*_union(history, progress.rollbacks), {"spike_step": cause.step, "step": point.step}]
    progress.injected = _union(injected, progress.injected)
    fresh_optimizer = point.contents is Contents.PARAMS
    if fresh_optimizer:
        progress.rewarm_from = point.step
    assert point.rollback_to is not None
    target = RunDir.parse_relpath(point.rollback_to)
    assert target is not None

    def rewind_run_dir() -> tuple[list[str], list[Role]]:
        committed = checkpointer.store.list()
        moved = checkpointer.store.roll_back(target, abandoned_by_rollback(committed, point.step))
        abandoned = [str(p.relative_to(checkpointer.store.path)) for p in moved]
        checkpointer.journal.append(
            "rollback",
            point.step,
            path=point.rollback_to,
            spike_step=cause.step,
            skipped=[[start, end]] if end > start else [],
            skipped_steps=cause.step - point.step + spike.skip_extra_steps,
            optimizer_restored=not fresh_optimizer,
            rewarmup_steps=spike.rewarmup_steps if fresh_optimizer else 0,
            set_aside=abandoned,  # the journal's field name
            **cause.fields,
        )
        return abandoned, tuple(c.role for c in committed if c.step == point.step)

    abandoned, roles = on_rank0(checkpointer.is_main, checkpointer.group, rewind_run_dir)
    # The target step again, now with the skipped range in its progress: a crash from here on resumes the new
    # trajectory exactly, never the spiked one. It replaces the old bytes through the store's atomic re-save.
    decision = decide_save(checkpointer.policy, point.step, SaveReason.RESAVE, roles)
    if decision is not None:
        checkpointer.save(point.step, list(decision.roles), decision.contents, train_state.state(decision.contents))
        checkpointer.wait()
    tell_user(
        f"curry-train: {cause.summary}: rolled back to step {point.step} ({point.rollback_to}), skipping samples "
        f"[{start}, {end}) ({(end - start) // batch_size} steps of data); "
        + (
            f"optimizer state starts fresh, lr re-warms over {spike.rewarmup_steps} steps"
            if fresh_optimizer
            else "optimizer state restored"
        )
        + f"; {len(abandoned)} newer checkpoint(s) set aside"
    )


def spike_target(
    verdict: Verdict, step: int, progress: Progress, checkpointer: Checkpointer, spike: SpikeConfig, batch_size: int
) -> tuple[ResumePoint, Cause]:
    """Where an in-process rollback after a spike at `step` goes, or a SpikeError when it cannot."""
    rule = spike.rule()
    seen = [r["spike_step"] for r in progress.rollbacks]
    if recent_rollbacks(seen, step, spike.max_rollbacks_within) >= spike.max_rollbacks:
        raise SpikeError(
            f"{verdict.reason}; this run already rolled back {spike.max_rollbacks} time(s) within the last "
            f"{spike.max_rollbacks_within} steps (spike.max_rollbacks): stopping with every checkpoint intact. Look at "
            "the data and the lr around these steps; raise spike.max_rollbacks to allow more"
        )
    bound = rollback_bound(step, rule, spike.rollback_margin)

    def choose() -> ResumePoint | None:
        journal = checkpointer.store.files.journal
        events = read_journal(journal) if journal.exists() else []
        extra = frozenset(int(e["step"]) for e in events if e["event"] == "preempt" and e.get("extra_save"))
        target = rollback_target(checkpointer.store.list(), bound, extra)
        return None if target is None else point_of(checkpointer.store.path_of(target), rollback_to=target.relpath)

    point = on_rank0(checkpointer.is_main, checkpointer.group, choose)
    if point is None:
        raise SpikeError(
            f"{verdict.reason}; no rollback or recovery checkpoint at or before step {bound} (the spike step less "
            f"spike.window={spike.window} and spike.rollback_margin={spike.rollback_margin}) to roll back to: "
            "stopping with every checkpoint intact"
        )
    injected = any(point.step < s <= step for s in progress.injected)
    fields = {
        "loss": verdict.loss,
        "baseline": verdict.baseline,
        "threshold": verdict.threshold,
        "reason": verdict.reason,
        "injected": injected,
    }
    how = " (injected by +debug.inject_spike_at)" if injected else ""
    summary = f"loss spike at step {step}{how}: {verdict.reason}"
    return point, Cause(step, progress.cursor + batch_size, fields, summary)


def manual_cause(point: ResumePoint, store: RunDir, batch_size: int) -> Cause:
    """A `+rollback_to`: the abandoned trajectory reached the last step in metrics.jsonl (rank 0 reads)."""
    metrics = store.files.metrics
    reached = point.step
    if metrics.exists():
        reached = max(point.step, _last_logged_step(metrics))
    # The cursor there: from the newest checkpoint at or before it (its manifest records the cursor), plus a batch
    # a step; the steps after a checkpoint skip nothing (a skip happens only at a rollback, which saves).
    trajectory = [c for c in store.list() if c.role is not Role.BEST_K and c.step <= reached]
    base = max(trajectory, key=lambda c: c.step, default=None)
    base_step, base_cursor = 0, 0
    if base is not None:
        recorded = store.manifest(base).cursor
        base_step, base_cursor = base.step, base.step * batch_size if recorded is None else recorded
    cursor = base_cursor + (reached - base_step) * batch_size
    fields = {"request": point.rollback_to, "reason": f"+rollback_to={point.rollback_to}"}
    return Cause(reached, cursor, fields, f"rollback requested (the run had reached step {reached})")


def _last_logged_step(metrics: Path) -> int:
    steps = read_metrics(metrics)
    if not steps:
        return 0
    # The line written last is where the current trajectory stopped (earlier trajectories may have gone further).
    return max(steps.values(), key=lambda r: (r.get("time", 0), r["step"]))["step"]


def _union(first: list, second: list) -> list:
    return first + [x for x in second if x not in first]
