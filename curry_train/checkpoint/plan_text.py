"""A plan as text (printed before a run and by `curry-train plan`) and as JSON (the journal's `policy` event)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from curry_train.checkpoint.cadence import ResumeTarget
from curry_train.checkpoint.plan import ROLLBACK_PARAMS_THRESHOLD, Plan, storage_fits
from curry_train.checkpoint.policy import Role
from curry_train.checkpoint.sizes import ABANDONED, CheckpointSize, RoleEstimate
from curry_train.units import human_bytes

# --------------------------------------------------------------------------------------------------- output


def _cadence_label(e: RoleEstimate) -> str:
    if e.every == 0:
        return "off"
    if e.role == ABANDONED:
        return "after a rollback"
    return "on dev improvement" if e.role == Role.BEST_K.value else f"every {e.every} steps"


def _short(count: int) -> str:
    """6738415616 -> 6.74e9: the magnitude at a glance."""
    return f"{count:.3g}".replace("e+0", "e").replace("e+", "e")


def _steps(count: int) -> str:
    return f"{count} step" + ("" if count == 1 else "s")


def _size_line(label: str, size: CheckpointSize) -> str:
    parts = [f"{human_bytes(size.params_bytes)} parameters"]
    if size.optimizer_bytes:
        parts.append(f"{human_bytes(size.optimizer_bytes)} AdamW state")
    parts.append(f"{human_bytes(size.extra_bytes)} extras")
    return f"  {label:<12} {human_bytes(size.total):>9} = " + " + ".join(parts)


def _render_sizes(plan: Plan) -> list[str]:
    p = plan.size.params
    return [
        f"model {plan.model_name}: {p:,} parameters ({_short(p)}) in {plan.size.tensors} tensors, world size "
        f"{plan.world_size}",
        "one checkpoint (fp32 parameters: 4 B each; AdamW: exp_avg + exp_avg_sq in fp32, 8 B each; extras: RNG, "
        "data position, scheduler, DCP metadata):",
        _size_line("full", plan.full) + f"  ({plan.full.total / max(p, 1):.2f} B/param)",
        _size_line("params only", plan.params_only),
    ]


def _render_storage(plan: Plan) -> list[str]:
    lines = [f"storage the policy commits over train.steps={plan.steps} (a role keeps no more than the run makes):"]
    for e in plan.roles:
        committed = human_bytes(e.committed) if e.every else "-"
        keep = f"keep {e.keep}" if e.kept == e.keep else f"keep {e.kept} of {e.keep}"
        lines.append(
            f"  {e.role:<9} {_cadence_label(e):<20} {e.contents:<7} {keep:<12} x "
            f"{human_bytes(e.bytes_each):>9} = {committed:>9}"
        )
    lines += [
        f"  {'in flight':<9} one save being written (the oldest is deleted only after it commits): "
        f"{human_bytes(plan.in_flight)}",
        *(
            [
                f"  {'uploads':<9} one save per remote role, its files kept until uploaded (checkpoint.remote): "
                f"{human_bytes(plan.awaiting_upload)}"
            ]
            if plan.awaiting_upload
            else []
        ),
        f"  committed {human_bytes(plan.committed)} (an upper bound: a rollback due at the same step as a recovery "
        "is a hard link to it and adds no bytes)",
        f"  for comparison: {sum(e.kept for e in plan.roles if e.every > 0)} full checkpoints would be "
        f"{human_bytes(plan.all_full)}",
    ]
    s = plan.storage
    held = f" + {human_bytes(s.held_bytes)} held by this run's checkpoints" if s.held_bytes else ""
    lines.append(f"  free space: {human_bytes(s.free_bytes)}{held} at {s.path} (run directory {plan.run_dir})")
    lines += [f"  WARNING: {warning}" for warning in plan.warnings]
    if not storage_fits(plan):
        consequence = (
            "training will refuse to start (checkpoint.check_storage=false overrides)"
            if plan.check_storage
            else "checkpoint.check_storage=false: training will start anyway and may run out of space"
        )
        lines.append(
            f"  WARNING: the policy does not fit: it commits {human_bytes(plan.committed)} but only "
            f"{human_bytes(s.available)} is available; {consequence}"
        )
    return lines


def _render_recommendation(plan: Plan) -> list[str]:
    r = plan.recommendation
    if r is None:
        return []
    rollback = next(e for e in plan.roles if e.role == Role.ROLLBACK.value)
    return [
        f"recommendation: one full checkpoint is {human_bytes(plan.full.total)} (over "
        f"{human_bytes(ROLLBACK_PARAMS_THRESHOLD)}): make rollback checkpoints parameters-only "
        "(checkpoint.rollback_contents=params)",
        f"  saves {human_bytes(r.saved_bytes)} ({rollback.kept} x "
        f"{human_bytes(plan.full.total - plan.params_only.total)}); committed becomes {human_bytes(r.committed_after)}",
        f"  trade-off: exact resume after a crash then comes from recovery checkpoints only: the worst-case crash "
        f"loss grows from {r.crash_cadence_before} to {_crash_loss(r.crash_cadence_after, plan.steps)}",
    ]


def _crash_loss(cadence: int | None, steps: int) -> str:
    if cadence is None or cadence > steps:
        return f"the whole run (no recovery checkpoint within train.steps={steps})"
    return f"{cadence} steps"


def _target(target: ResumeTarget, verb: str) -> str:
    if target.relpath is None:
        return f"no checkpoint before it: starts again from step 0, {_steps(target.steps_lost)} lost"
    return f"{verb} {target.relpath} (step {target.step}): {_steps(target.steps_lost)} lost"


def _render_worst_case(plan: Plan) -> list[str]:
    if plan.crash is None or plan.spike is None:
        return []
    lines = [
        f"worst case at step {plan.crash.at_step}:",
        f"  crash:      {_target(plan.crash, 'resumes exactly from')}",
        f"  loss spike: {_target(plan.spike, 'rolls back to')}",
    ]
    fallback = plan.crash.fallback_step
    if fallback is not None and plan.crash.relpath is not None:
        lines.append(
            f"  (saves are asynchronous: if the step-{plan.crash.step} save was still being written, the crash "
            f"resumes from step {fallback}: {_steps(plan.crash.at_step - fallback)} lost)"
        )
    return lines


def _render_cadence(plan: Plan) -> list[str]:
    t, c = plan.timing, plan.cadence
    if c is None:
        missing = [
            flag
            for flag, value in (("--save-seconds", t.save_seconds), ("--step-seconds", t.step_seconds))
            if value is None
        ]
        # Training prints this too: say how the figures come without naming options training does not take.
        return [
            "cadence: no recommendation yet: no "
            + " and no ".join(flag.removeprefix("--").replace("-", " ") for flag in missing)
            + " measured in this run directory; the run measures them as it trains, and `curry-train plan` with "
            "the same overrides then recommends a cadence (or give it "
            + " ".join(f"{flag} S" for flag in missing)
            + ")"
        ]
    assert t.save_seconds is not None and t.step_seconds is not None
    lines = [
        "cadence (Young/Daly; covers crashes, not spikes):",
        f"  save cost C = {t.save_seconds:.3g} s ({t.save_source})",
        f"  step time {t.step_seconds:.3g} s ({t.step_source})",
        f"  MTBF M = {t.mtbf_seconds / 3600:.3g} h ({t.mtbf_source})",
        f"  Young sqrt(2CM) = {c.young_seconds:.0f} s; Daly {c.daly_seconds:.0f} s = every {c.optimum_steps} steps",
    ]
    if c.configured_steps is not None and c.wasted_configured is not None:
        auto = "auto: " if c.configured_role in plan.auto_roles else ""
        lines.append(
            f"  time lost to saving + recomputation: {c.wasted_configured:.1%} at the configured exact-resume cadence "
            f"(checkpoint.{c.configured_role}_every={auto}{c.configured_steps}), {c.wasted_optimum:.1%} at every "
            f"{c.optimum_steps} steps"
        )
    else:
        lines.append(f"  no role saves full state; at every {c.optimum_steps} steps {c.wasted_optimum:.1%} is lost")
    return lines


def clamp_words(clamped: str | None, optimum_steps: float | None) -> str:
    """Why an automatic interval is what it is, in a few words (the plan and `status` say it alike)."""
    if optimum_steps is None:
        return "nothing measured yet: checkpoint.auto_min_every, so the first save comes early and is measured"
    daly = f"Daly's optimum {optimum_steps:.1f} steps"
    return {
        None: daly,
        "min": f"{daly}, raised to checkpoint.auto_min_every",
        "max": f"{daly}, lowered to checkpoint.auto_max_every (default: train.steps)",
        "overhead": f"{daly}, raised so saves cost at most checkpoint.max_overhead of training time",
    }.get(clamped, f"{daly}, clamped: {clamped}")


def _render_auto(plan: Plan) -> list[str]:
    if plan.auto is None:
        return []
    keys = " and ".join(f"checkpoint.{role}_every=auto" for role in plan.auto_roles)
    clamped = plan.auto.clamped.value if plan.auto.clamped else None
    return [f"  {keys}: every {plan.auto.every} steps ({clamp_words(clamped, plan.auto.optimum_steps)})"]


def render_plan(plan: Plan) -> str:
    """The plan as the text block that `curry-train plan` and the start of training print."""
    sections = [
        _render_sizes(plan),
        _render_storage(plan),
        _render_recommendation(plan),
        _render_worst_case(plan),
        _render_cadence(plan),
        _render_auto(plan),
        [f"hang timeout: {plan.hang_timeout_s:.0f} s ({plan.hang_source}): no progress for this long ends the job"],
    ]
    return "\n".join(line for section in sections for line in section)


def plan_json(plan: Plan) -> dict[str, Any]:
    """The plan as one JSON-serialisable object (`curry-train plan --json`)."""
    out: dict[str, Any] = {
        "model": plan.model_name,
        "params": plan.size.params,
        "tensors": plan.size.tensors,
        "world_size": plan.world_size,
        "run_dir": plan.run_dir,
        "full_checkpoint": asdict(plan.full) | {"total": plan.full.total},
        "params_only_checkpoint": asdict(plan.params_only) | {"total": plan.params_only.total},
        "bytes_per_checkpoint": {e.role: e.bytes_each for e in plan.roles},
        "roles": {e.role: asdict(e) | {"kept": e.kept, "committed": e.committed} for e in plan.roles},
        "steps": plan.steps,
        "warnings": plan.warnings,
        "in_flight_bytes": plan.in_flight,
        "awaiting_upload_bytes": plan.awaiting_upload,
        "committed_bytes": plan.committed,
        "all_full_bytes": plan.all_full,
        "free_bytes": plan.storage.free_bytes,
        "held_bytes": plan.storage.held_bytes,
        "storage_path": plan.storage.path,
        "fits": storage_fits(plan),
        "check_storage": plan.check_storage,
        "recommendation": None if plan.recommendation is None else asdict(plan.recommendation),
        "timing": asdict(plan.timing),
        "cadence": None if plan.cadence is None else asdict(plan.cadence),
        "auto": None if plan.auto is None else asdict(plan.auto) | {"roles": list(plan.auto_roles)},
        "hang_timeout_s": plan.hang_timeout_s,
    }
    if plan.crash is not None and plan.spike is not None:
        out["at_step"] = plan.crash.at_step
        out["worst_case_resume_step"] = plan.crash.step
        out["crash"] = asdict(plan.crash) | {"steps_lost": plan.crash.steps_lost}
        out["spike"] = asdict(plan.spike) | {"steps_lost": plan.spike.steps_lost}
    return out
