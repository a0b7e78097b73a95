"""The plan of a checkpoint policy: storage it commits, worst-case resume points, and a Young/Daly cadence.

Everything here is arithmetic over the config, the parameter count and a few measurements of an existing run
directory (save and step times from its journal and metrics, the free space under it). Nothing here imports torch:
`model_size` counts parameters from `model_shapes`.

Size model of one DCP checkpoint (FileSystemWriter, one ``.distcp`` file per rank plus ``.metadata``):
    tensor bytes   parameters in fp32 (4 B each); a full checkpoint adds AdamW's exp_avg and exp_avg_sq in fp32
                   (8 B each) and one 0-d fp32 ``step`` per parameter tensor
    item overhead  DCP writes every tensor shard and every small value through ``torch.save``, whose zip container
                   costs ~1.3-1.6 KB per item; ``.metadata`` adds ~0.3 KB per tensor item. FSDP2 shards every
                   parameter (and so its AdamW state) over all ranks: W items each; ``step`` is replicated: 1 item
    small values   progress counters (every role); scheduler position and AdamW's param-group settings (full)
    per rank       RNG states (Python, NumPy, torch: ~17 KB pickled), fidelity record (full)
The constants were measured on torch 2.13 checkpoints of model=tiny and model=small (world sizes 1 and 2); the
estimate is within 0.1% there. For large models only the tensor bytes matter.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from curry_train.checkpoint.policy import (
    Checkpoint,
    Policy,
    Role,
    RollbackContents,
    exact_resume_candidates,
    rollback_target,
)
from curry_train.config import CheckpointConfig, Config, ConfigError, ModelConfig
from curry_train.model_shapes import parameter_shapes

PARAM_BYTES = 4  # FSDP2 keeps fp32 parameter shards even when it computes in bf16
ADAMW_STATE_BYTES = 8  # exp_avg and exp_avg_sq, fp32 each
ADAMW_STEP_BYTES = 4  # one 0-d fp32 step counter per parameter tensor
TENSOR_ITEM_BYTES = 1_880  # torch.save container in .distcp (~1,576 B) + entry in .metadata (~300 B)
VALUE_ITEM_BYTES = 1_420  # a small pickled value: torch.save container (~1,261 B) + .metadata entry (~160 B)
PROGRESS_VALUES = 5  # progress (step, world_size, history) + dataloader (cursor, skipped): every role
FULL_SHARED_VALUES = 31  # progress and dataloader (5) + scheduler (2) + 2 AdamW param groups x 12 settings
PER_RANK_FULL_BYTES = 20_500  # RNG states (~17.4 KB) + fidelity record, per rank
METADATA_BASE_BYTES = 80
MANIFEST_BYTES = 400  # manifest.json without its file entries
MANIFEST_FILE_BYTES = 80  # one file entry of manifest.json (name, size, xxh3-64 checksum)

ROLLBACK_PARAMS_THRESHOLD = 10e9  # above this size of a full checkpoint, recommend parameters-only rollbacks
DEFAULT_MTBF_HOURS = 24.0


# ------------------------------------------------------------------------------------------ checkpoint sizes


@dataclass(frozen=True)
class ModelSize:
    params: int  # parameter count of the unsharded model
    tensors: int  # number of parameter tensors (each costs a DCP item per rank)


@dataclass(frozen=True)
class CheckpointSize:
    """Bytes of one checkpoint on disk, split into what the user recognises."""

    params_bytes: int
    optimizer_bytes: int
    extra_bytes: int  # item headers, metadata, RNG, data position, scheduler, manifest

    @property
    def total(self) -> int:
        return self.params_bytes + self.optimizer_bytes + self.extra_bytes


def model_size(cfg: ModelConfig) -> ModelSize:
    """Parameter count and tensor count of the model, from its shapes: no torch, so `curry-train plan` starts fast."""
    shapes = parameter_shapes(cfg)
    return ModelSize(sum(math.prod(shape) for shape in shapes.values()), len(shapes))


def _as_size(size: ModelSize | int) -> ModelSize:
    # A bare parameter count (the older call style) has no tensor count: its item overhead is left out.
    return size if isinstance(size, ModelSize) else ModelSize(size, 0)


def checkpoint_size(size: ModelSize | int, full: bool, world_size: int = 1) -> CheckpointSize:
    """One checkpoint's bytes: full (parameters + AdamW state + RNG, data position, scheduler) or parameters only."""
    size = _as_size(size)
    tensor_items = size.tensors * world_size
    values = PROGRESS_VALUES
    per_rank = 0
    optimizer = 0
    if full:
        tensor_items += 2 * size.tensors * world_size + size.tensors  # exp_avg, exp_avg_sq sharded; step replicated
        values = FULL_SHARED_VALUES
        per_rank = PER_RANK_FULL_BYTES * world_size
        optimizer = size.params * ADAMW_STATE_BYTES + size.tensors * ADAMW_STEP_BYTES
    files = world_size + 1  # one .distcp per rank and .metadata
    extra = (
        tensor_items * TENSOR_ITEM_BYTES
        + values * VALUE_ITEM_BYTES
        + per_rank
        + METADATA_BASE_BYTES
        + MANIFEST_BYTES
        + files * MANIFEST_FILE_BYTES
    )
    return CheckpointSize(size.params * PARAM_BYTES, optimizer, extra)


def checkpoint_bytes(params: ModelSize | int, full: bool, world_size: int = 1) -> int:
    return checkpoint_size(params, full, world_size).total


@dataclass(frozen=True)
class RoleEstimate:
    role: str
    every: int  # cadence in steps; for best_k, best_k itself (0: disabled)
    contents: str
    keep: int
    bytes_each: int
    makes: int | None = None  # how many the run can make in train.steps (None: no limit known)

    @property
    def kept(self) -> int:
        """What the role holds at most: its keep, or fewer when the run is too short to make that many."""
        return self.keep if self.makes is None else min(self.keep, self.makes)

    @property
    def committed(self) -> int:
        return self.kept * self.bytes_each if self.every > 0 else 0


def checkpoints_made(every: int, steps: int | None) -> int | None:
    """Saves at a cadence of `every` steps within `steps` (a save at step 0 is never made)."""
    return None if steps is None or every <= 0 else steps // every


def evaluations(steps: int | None, eval_every: int) -> int | None:
    """Evaluations in a run: every `eval_every` steps and at the last step (each may enter best-K)."""
    if steps is None:
        return None
    return 0 if eval_every <= 0 else math.ceil(steps / eval_every)


SET_ASIDE = "set_aside"


def role_estimates(
    size: ModelSize | int, policy: Policy, world_size: int = 1, steps: int | None = None, eval_every: int = 0
) -> list[RoleEstimate]:
    """Each role's cadence, contents, keep and size; with `steps`, capped at what a run of that length makes."""
    full = checkpoint_bytes(size, True, world_size)
    params_only = checkpoint_bytes(size, False, world_size)
    rollback_full = policy.full_rollback
    cadences = (policy.rollback_every, policy.recovery_every)
    return [
        RoleEstimate(
            Role.ROLLBACK.value,
            policy.rollback_every,
            policy.rollback_contents.value,
            policy.rollback_keep,
            full if rollback_full else params_only,
            checkpoints_made(policy.rollback_every, steps),
        ),
        RoleEstimate(
            Role.RECOVERY.value,
            policy.recovery_every,
            "full",
            policy.recovery_keep,
            full,
            checkpoints_made(policy.recovery_every, steps),
        ),
        RoleEstimate(
            Role.BEST_K.value, policy.best_k, "params", policy.best_k, params_only, evaluations(steps, eval_every)
        ),
        # A rollback sets the abandoned trajectory's checkpoints aside; the newest abandoned_keep of them stay.
        RoleEstimate(
            SET_ASIDE,
            int(policy.rollback_every > 0 or policy.recovery_every > 0),
            "full" if policy.recovery_every > 0 or rollback_full else "params",
            policy.abandoned_keep,
            full if policy.recovery_every > 0 or rollback_full else params_only,
            None if steps is None else sum(checkpoints_made(e, steps) or 0 for e in cadences),
        ),
    ]


def in_flight_bytes(estimates: list[RoleEstimate]) -> int:
    """The largest checkpoint an enabled role writes: one save in progress, not yet able to free an old one."""
    return max((e.bytes_each for e in estimates if e.committed), default=0)


def committed_bytes(estimates: list[RoleEstimate], in_flight: bool = True) -> int:
    """Keep counts times sizes, plus (``in_flight``) one slot for the save being written.

    The slot is needed whether saves are asynchronous or not: retention deletes the oldest checkpoint of a role
    only after the new one commits, so for a moment a role holds keep + 1.
    """
    return sum(e.committed for e in estimates) + (in_flight_bytes(estimates) if in_flight else 0)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def policy_of(cfg: CheckpointConfig) -> Policy:
    """The checkpoint block of the config as a Policy; its check failures become ConfigErrors naming the key."""
    try:
        return Policy(
            cfg.rollback_every,
            cfg.recovery_every,
            cfg.best_k,
            cfg.best_k_metric,
            cfg.best_k_direction,
            cfg.retention.rollback_keep,
            cfg.retention.recovery_keep,
            cfg.rollback_contents,
            cfg.retention.abandoned_keep,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None


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
    found = []
    for role, every, keep in (
        (Role.ROLLBACK, policy.rollback_every, policy.rollback_keep),
        (Role.RECOVERY, policy.recovery_every, policy.recovery_keep),
    ):
        if every > 0:
            newest = (step - 1) // every * every
            found += [Checkpoint(role, s) for s in range(newest, 0, -every)[:keep]]
    return found


def crash_target(policy: Policy, step: int, async_save: bool = False) -> ResumeTarget:
    """Worst case for a crash at ``step``: the save due at ``step`` never commits, so the newest one before it."""
    candidates = exact_resume_candidates(checkpoints_before(policy, step), policy)
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


# ------------------------------------------------------------------------ measurements from a run directory


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def measured_save_seconds(run_dir: Path, async_save: bool) -> tuple[float, int] | None:
    """Median time training paid per full save in this run's journal, and how many saves that covers.

    Asynchronous saves cost training their ``cost_seconds`` (blocked time plus the extra time of the steps they
    overlapped), synchronous ones their ``seconds``. Hard-linked saves (``linked_from``) cost nothing and are skipped.
    """
    from curry_train.journal import read_journal  # stdlib-only module; imported here to keep plan's imports small

    path = run_dir / "journal.jsonl"
    if not path.is_file():
        return None
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
    median = _median(values)
    return None if median is None else (median, len(values))


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
    lighter = Policy(**{**asdict(policy), "rollback_contents": RollbackContents.PARAMS})
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
    policy = policy_of(cfg.checkpoint)
    async_save = cfg.checkpoint.async_save
    steps = cfg.train.steps
    roles = role_estimates(size, policy, world_size, steps, cfg.train.eval_every)
    timing = timing_of(run_dir, async_save, save_seconds, step_seconds, mtbf_hours)
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
        full_save_seconds=(measured_save_seconds(run_dir, async_save=False) or (None,))[0],
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


# --------------------------------------------------------------------------------------------------- output


def _cadence_label(e: RoleEstimate) -> str:
    if e.every == 0:
        return "off"
    if e.role == SET_ASIDE:
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
        lines.append(
            f"  time lost to saving + recomputation: {c.wasted_configured:.1%} at the configured exact-resume cadence "
            f"(checkpoint.{c.configured_role}_every={c.configured_steps}), {c.wasted_optimum:.1%} at every "
            f"{c.optimum_steps} steps"
        )
    else:
        lines.append(f"  no role saves full state; at every {c.optimum_steps} steps {c.wasted_optimum:.1%} is lost")
    return lines


def render_plan(plan: Plan) -> str:
    """The plan as the text block that `curry-train plan` and the start of training print."""
    sections = [
        _render_sizes(plan),
        _render_storage(plan),
        _render_recommendation(plan),
        _render_worst_case(plan),
        _render_cadence(plan),
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
    }
    if plan.crash is not None and plan.spike is not None:
        out["at_step"] = plan.crash.at_step
        out["worst_case_resume_step"] = plan.crash.step
        out["crash"] = asdict(plan.crash) | {"steps_lost": plan.crash.steps_lost}
        out["spike"] = asdict(plan.spike) | {"steps_lost": plan.spike.steps_lost}
    return out
