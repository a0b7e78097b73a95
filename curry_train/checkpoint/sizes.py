"""Checkpoint sizes: the bytes of one checkpoint of either contents, and what each role commits over a run.

Arithmetic over the parameter count and the policy; nothing here imports torch (`model_size` counts parameters
from `model_shapes`).

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

import math
from dataclasses import dataclass

from curry_train.checkpoint.policy import Policy, Role
from curry_train.config import ModelConfig
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


def checkpoint_size(size: ModelSize, full: bool, world_size: int = 1) -> CheckpointSize:
    """One checkpoint's bytes: full (parameters + AdamW state + RNG, data position, scheduler) or parameters only."""
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


def checkpoint_bytes(size: ModelSize, full: bool, world_size: int = 1) -> int:
    return checkpoint_size(size, full, world_size).total


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


ABANDONED = "set_aside"  # what rollbacks set aside, under the name the plan shows (as the journal does)


def role_estimates(
    size: ModelSize, policy: Policy, world_size: int = 1, steps: int | None = None, eval_every: int = 0
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
            ABANDONED,
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


def awaiting_upload_bytes(estimates: list[RoleEstimate], remote_roles: set[str]) -> int:
    """With `checkpoint.remote`: each remote role's upload lane holds the local files of one save until its upload
    ends (hard links of a committed checkpoint that local retention may delete meanwhile; on nodes without a shared
    filesystem, the save's only copy)."""
    return sum(e.bytes_each for e in estimates if e.role in remote_roles and e.committed)


def committed_bytes(estimates: list[RoleEstimate], in_flight: bool = True) -> int:
    """Keep counts times sizes, plus (``in_flight``) one slot for the save being written.

    The slot is needed whether saves are asynchronous or not: retention deletes the oldest checkpoint of a role
    only after the new one commits, so for a moment a role holds keep + 1.
    """
    return sum(e.committed for e in estimates) + (in_flight_bytes(estimates) if in_flight else 0)
