"""Storage estimate of a checkpoint policy, from the parameter count alone (pure arithmetic, no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from curry_train.checkpoint.policy import Policy, RollbackContents

# AdamW keeps two fp32 tensors per parameter (exp_avg, exp_avg_sq); the parameters are fp32 too.
PARAM_BYTES = 4
ADAMW_STATE_BYTES = 8
# Per-checkpoint extras (metadata, RNG, dataloader, counters): small, but not zero for tiny models.
EXTRA_BYTES_BASE = 64_000
EXTRA_BYTES_PER_RANK = 24_000


@dataclass(frozen=True)
class RoleEstimate:
    role: str
    every: int  # cadence in steps; for best_k, best_k itself (0: disabled)
    contents: str
    keep: int
    bytes_each: int

    @property
    def committed(self) -> int:
        return self.keep * self.bytes_each if self.every > 0 else 0


def checkpoint_bytes(params: int, full: bool, world_size: int = 1) -> int:
    per_param = PARAM_BYTES + (ADAMW_STATE_BYTES if full else 0)
    return params * per_param + EXTRA_BYTES_BASE + EXTRA_BYTES_PER_RANK * world_size


def role_estimates(params: int, policy: Policy, world_size: int = 1) -> list[RoleEstimate]:
    full = checkpoint_bytes(params, True, world_size)
    params_only = checkpoint_bytes(params, False, world_size)
    rollback_full = policy.rollback_contents is RollbackContents.FULL
    return [
        RoleEstimate(
            "rollback",
            policy.rollback_every,
            policy.rollback_contents.value,
            policy.rollback_keep,
            full if rollback_full else params_only,
        ),
        RoleEstimate("recovery", policy.recovery_every, "full", policy.recovery_keep, full),
        RoleEstimate("best_k", policy.best_k, "params", policy.best_k, params_only),
    ]


def committed_bytes(estimates: list[RoleEstimate], async_save: bool = False) -> int:
    """Keep counts times sizes, plus one in-flight slot for an asynchronous save being written."""
    total = sum(e.committed for e in estimates)
    if async_save:
        total += max((e.bytes_each for e in estimates if e.committed), default=0)
    return total


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"
