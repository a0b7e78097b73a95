"""The plan of a checkpoint policy: the storage it commits against the free space, worst-case resume points, a
Young/Daly cadence, and a recommendation; built before a run starts and by `curry-train plan`.

The arithmetic lives in `sizes` (bytes) and `cadence` (resume points, Young/Daly); the text in `plan_text`. This
module puts them together with a few measurements of an existing run directory (save and step times from its
journal and metrics, the free space under it). Nothing here imports torch.
"""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from curry_train.checkpoint.cadence import (
    Cadence,
    ResumeTarget,
    Timing,
    cadence,
    crash_target,
    exact_resume_cadence,
    spike_distance,
    spike_target,
)
from curry_train.checkpoint.policy import Contents, Policy, Role
from curry_train.checkpoint.sizes import (
    CheckpointSize,
    ModelSize,
    RoleEstimate,
    checkpoint_bytes,
    checkpoint_size,
    committed_bytes,
    human_bytes,
    in_flight_bytes,
    role_estimates,
)
from curry_train.config import Config
from curry_train.watchdog import hang_timeout

ROLLBACK_PARAMS_THRESHOLD = 10e9  # above this size of a full checkpoint, recommend parameters-only rollbacks
DEFAULT_MTBF_HOURS = 24.0


# ----------------------------------------------------------------------------------------------- free space


@dataclass(frozen=True)
class Storage:
    path: str  # the existing directory whose filesystem was measured
    free_bytes: int
    held_bytes: int  # what this run's committed checkpoints already occupy (they count toward the commitment)

    @property
    def available(self) -> int:
        return self.free_bytes + self.held_bytes


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists: where the run directory will be created."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def measure_storage(run_dir: Path) -> Storage:
    from curry_train.checkpoint.store import RunDir  # stdlib-only module; imported here to keep plan's imports small

    where = nearest_existing(run_dir)
    held = RunDir(run_dir).disk_usage() if run_dir.is_dir() else 0
    return Storage(str(where), shutil.disk_usage(where).free, held)


# ------------------------------------------------------------------------ measurements from a run directory


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def measured_save_seconds(run_dir: Path, async_save: bool) -> tuple[float, int] | None:
    """Median time training paid per full save in this run's journal, and how many saves that covers."""
    values = save_costs(run_dir, async_save)
    return (statistics.median(values), len(values)) if values else None


def save_costs(run_dir: Path, async_save: bool) -> list[float]:
    """What training paid for each full save in this run's journal, in order.

    Asynchronous saves cost training their ``cost_seconds`` (blocked time plus the extra time of the steps they
    overlapped), synchronous ones their ``seconds``. Hard-linked saves (``linked_from``) cost nothing and are skipped.
    """
    from curry_train.journal import read_journal  # stdlib-only module; imported here to keep plan's imports small

    path = run_dir / "journal.jsonl"
    if not path.is_file():
        return []
    # An asynchronous save costs training what its steps lost (`cost_seconds`, measured against clean steps), not
    # just its blocked time; journals written before that field existed have only `blocking_seconds`.
    keys = ("cost_seconds", "blocking_seconds") if async_save else ("seconds",)
    values = []
    for r in read_journal(path):
        if r["event"] != "save" or r.get("linked_from") or r.get("contents", "full") != "full":
            continue
        value = next((r[k] for k in keys if isinstance(r.get(k), (int, float))), None)
        if value is not None:
            values.append(float(value))
    return values


def measured_step_seconds(run_dir: Path) -> tuple[float, int] | None:
    """Median wall time between consecutive steps in this run's metrics.jsonl, and how many pairs that covers."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    points = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if isinstance(record, dict) and isinstance(record.get("step"), int) and "time" in record:
            points.append((record["step"], float(record["time"])))
    # Only step n -> n+1 pairs: a resume restarts the step count and a gap between launches is not a step.
    diffs = [t1 - t0 for (s0, t0), (s1, t1) in zip(points, points[1:], strict=False) if s1 == s0 + 1 and t1 > t0]
    median = _median(diffs)
    return None if median is None else (median, len(diffs))


def timing_of(
    run_dir: Path,
    async_save: bool,
    save_seconds: float | None = None,
    step_seconds: float | None = None,
    mtbf_hours: float | None = None,
) -> Timing:
    """Given values win; else what this run measured; the MTBF falls back to a stated default."""
    save_source, step_source = "--save-seconds", "--step-seconds"
    if save_seconds is None and (measured := measured_save_seconds(run_dir, async_save)) is not None:
        save_seconds = measured[0]
        save_source = f"median of {measured[1]} full saves in {run_dir / 'journal.jsonl'}"
    if step_seconds is None and (measured := measured_step_seconds(run_dir)) is not None:
        step_seconds = measured[0]
        step_source = f"median of {measured[1]} steps in {run_dir / 'metrics.jsonl'}"
    if save_seconds is not None and async_save:
        save_source += "; blocking time, since saves are asynchronous"
    mtbf_source = "--mtbf-hours" if mtbf_hours is not None else "assumed default; set --mtbf-hours"
    hours = DEFAULT_MTBF_HOURS if mtbf_hours is None else mtbf_hours
    return Timing(save_seconds, save_source, step_seconds, step_source, hours * 3600.0, mtbf_source)


# ---------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Recommendation:
    """Parameters-only rollbacks: what they save, and the exact-resume cadence they leave."""

    saved_bytes: int
    committed_after: int
    crash_cadence_before: int | None
    crash_cadence_after: int | None


@dataclass(frozen=True)
class Plan:
    model_name: str
    steps: int
    size: ModelSize
    world_size: int
    run_dir: str
    async_save: bool
    check_storage: bool
    full: CheckpointSize
    params_only: CheckpointSize
    roles: list[RoleEstimate]
    in_flight: int
    committed: int
    storage: Storage
    recommendation: Recommendation | None
    crash: ResumeTarget | None
    spike: ResumeTarget | None
    timing: Timing
    cadence: Cadence | None
    preempt_grace_s: float = 30.0
    full_save_seconds: float | None = None  # measured in this run's journal: a whole full save, until committed
    hang_timeout_s: float = 300.0  # the watchdog's timeout at the start (the automatic one grows as the run measures)
    hang_source: str = ""

    @property
    def all_full(self) -> int:
        """What the kept checkpoints would cost if every one held full state."""
        return sum(e.kept for e in self.roles if e.every > 0) * self.full.total

    @property
    def warnings(self) -> list[str]:
        """Cadences the run is too short to reach, and a run that can never resume exactly."""
        out = [
            f"checkpoint.{_EVERY_KEY[e.role]}={e.every} exceeds train.steps={self.steps}: this run makes no "
            f"{e.role} checkpoint"
            for e in self.roles
            if e.role in _EVERY_KEY and e.every > 0 and e.makes == 0  # set_aside's `every` is a flag, no cadence
        ]
        full_roles = [e for e in self.roles if e.contents == "full" and e.every > 0 and e.role != Role.BEST_K.value]
        if self.steps > 0 and not any(e.makes for e in full_roles):
            out.append("no checkpoint with full state within the run: a crash restarts it from step 0")
        if self.full_save_seconds is not None and self.full_save_seconds > self.preempt_grace_s:
            out.append(
                f"a full save took {self.full_save_seconds:.0f} s in this run, more than "
                f"checkpoint.preempt_grace_s={self.preempt_grace_s:g}: a preemption save would be killed before it "
                "commits; raise torchrun's --shutdown-timeout and SLURM's --signal lead time, then preempt_grace_s"
            )
        return out


_EVERY_KEY = {Role.ROLLBACK.value: "rollback_every", Role.RECOVERY.value: "recovery_every", Role.BEST_K.value: "best_k"}


def recommend_params_rollback(
    policy: Policy,
    roles: list[RoleEstimate],
    world_size: int,
    size: ModelSize,
    steps: int | None = None,
    eval_every: int = 0,
) -> Recommendation | None:
    """When a full checkpoint is large and rollbacks hold full state: the saving of parameters-only rollbacks."""
    full = checkpoint_bytes(size, True, world_size)
    if full <= ROLLBACK_PARAMS_THRESHOLD or not policy.full_rollback:
        return None
    if policy.rollback_every == 0:
        return None
    lighter = Policy(**{**asdict(policy), "rollback_contents": Contents.PARAMS})
    after = role_estimates(size, lighter, world_size, steps, eval_every)
    before_cadence, after_cadence = exact_resume_cadence(policy), exact_resume_cadence(lighter)
    return Recommendation(
        saved_bytes=committed_bytes(roles) - committed_bytes(after),
        committed_after=committed_bytes(after),
        crash_cadence_before=before_cadence[0] if before_cadence else None,
        crash_cadence_after=after_cadence[0] if after_cadence else None,
    )


def build_plan(
    cfg: Config,
    size: ModelSize,
    world_size: int,
    run_dir: Path,
    at_step: int | None = None,
    save_seconds: float | None = None,
    step_seconds: float | None = None,
    mtbf_hours: float | None = None,
) -> Plan:
    """Everything `curry-train plan` prints, for a resolved config (raises ConfigError for a bad policy)."""
    policy = cfg.checkpoint.policy()
    async_save = cfg.checkpoint.async_save
    steps = cfg.train.steps
    roles = role_estimates(size, policy, world_size, steps, cfg.train.eval_every)
    timing = timing_of(run_dir, async_save, save_seconds, step_seconds, mtbf_hours)
    full_save = (measured_save_seconds(run_dir, async_save=False) or (None,))[0]
    hang = hang_timeout(cfg.train.hang_timeout_s, timing.step_seconds, full_save)
    return Plan(
        model_name=cfg.model.name,
        steps=steps,
        size=size,
        world_size=world_size,
        run_dir=str(run_dir),
        async_save=async_save,
        check_storage=cfg.checkpoint.check_storage,
        full=checkpoint_size(size, True, world_size),
        params_only=checkpoint_size(size, False, world_size),
        roles=roles,
        in_flight=in_flight_bytes(roles),
        committed=committed_bytes(roles),
        storage=measure_storage(run_dir),
        recommendation=recommend_params_rollback(policy, roles, world_size, size, steps, cfg.train.eval_every),
        crash=None if at_step is None else crash_target(policy, at_step, async_save),
        spike=None if at_step is None else spike_target(policy, at_step, spike_distance(cfg)),
        timing=timing,
        cadence=cadence(policy, timing),
        preempt_grace_s=cfg.checkpoint.preempt_grace_s,
        full_save_seconds=full_save,
        hang_timeout_s=hang[0],
        hang_source=hang[1],
    )


def storage_fits(plan: Plan) -> bool:
    """Whether the committed storage fits in the free space (plus what this run's checkpoints already hold)."""
    return plan.committed <= plan.storage.available


def storage_refusal(plan: Plan) -> str | None:
    """The message training exits with when the policy does not fit and the check is on; None otherwise."""
    if storage_fits(plan) or not plan.check_storage:
        return None
    return (
        f"the checkpoint policy commits {human_bytes(plan.committed)} but {plan.storage.path} has "
        f"{human_bytes(plan.storage.available)} available; lower the keep counts, make rollbacks parameters-only "
        "(checkpoint.rollback_contents=params), point run.root at a larger filesystem, or start anyway with "
        "checkpoint.check_storage=false"
    )
