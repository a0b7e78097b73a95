"""The plan of a checkpoint policy: the storage it commits against the free space, worst-case resume points, a
Young/Daly cadence, and a recommendation; built before a run starts and by `curry-train plan`.

The arithmetic lives in `sizes` (bytes) and `cadence` (resume points, Young/Daly, the automatic interval); the text
in `plan_text`; what a run directory measured (save and step times, interruptions) is read by `history`. This
module puts them together with the free space under the run directory. Nothing here imports torch.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from curry_train.checkpoint.cadence import (
    AutoInterval,
    Cadence,
    ResumeTarget,
    Timing,
    auto_interval,
    cadence,
    crash_target,
    exact_resume_cadence,
    spike_distance,
    spike_target,
    with_interval,
)
from curry_train.checkpoint.policy import Contents, Policy, Role
from curry_train.checkpoint.sizes import (
    CheckpointSize,
    ModelSize,
    RoleEstimate,
    awaiting_upload_bytes,
    checkpoint_bytes,
    checkpoint_size,
    committed_bytes,
    in_flight_bytes,
    role_estimates,
)
from curry_train.config import Config
from curry_train.history import measured_save_seconds, timing_of
from curry_train.units import human_bytes
from curry_train.watchdog import hang_timeout

ROLLBACK_PARAMS_THRESHOLD = 10e9  # above this size of a full checkpoint, recommend parameters-only rollbacks


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
    awaiting_upload: int = 0  # checkpoint.remote: local copies waiting for their upload (counted in `committed`)
    full_save_seconds: float | None = None  # measured in this run's journal: a whole full save, until committed
    hang_timeout_s: float = 300.0  # the watchdog's timeout at the start (the automatic one grows as the run measures)
    hang_source: str = ""
    auto_roles: tuple[str, ...] = ()  # roles whose cadence is `auto`
    auto: AutoInterval | None = None  # the interval they get for this timing (what the run decides alike)

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
    remote_roles = set(cfg.checkpoint.remote_roles) if cfg.checkpoint.remote is not None else set()
    awaiting = awaiting_upload_bytes(roles, remote_roles)
    key = "checkpoint.mtbf_hours" if mtbf_hours is None else "--mtbf-hours"
    prior = cfg.checkpoint.mtbf_hours if mtbf_hours is None else mtbf_hours
    timing = timing_of(run_dir, async_save, prior, key, save_seconds, step_seconds)
    auto_roles = cfg.checkpoint.auto_roles()
    auto = auto_decision(cfg, timing) if auto_roles else None
    if auto is not None:  # what the run would save at now, rather than auto's starting point
        policy = with_interval(policy, auto_roles, auto.every)
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
        committed=committed_bytes(roles) + awaiting,
        awaiting_upload=awaiting,
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
        auto_roles=tuple(r.value for r in auto_roles),
        auto=auto,
    )


def auto_decision(cfg: Config, timing: Timing) -> AutoInterval:
    """The interval `checkpoint.*_every=auto` takes for ``timing``: the run's decision and the plan's are this call."""
    return auto_interval(
        timing.save_seconds, timing.step_seconds, timing.mtbf_seconds, cfg.checkpoint.auto_bounds(cfg.train.steps)
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
