"""What the `+debug.*` faults (`config.Faults`) do, each in the one place it acts: a loss spike, a stalled rank and
an inexact resume (a full disk and a slow save act in the checkpointer, a stalled upload in the uploader)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from curry_train import watchdog
from curry_train.checkpoint.state import Progress
from curry_train.config import ConfigError, Faults
from curry_train.journal import Journal


def check(faults: Faults, world_size: int) -> None:
    if faults.stall_at is not None and not 0 <= faults.stall_rank < world_size:
        raise ConfigError(f"debug.stall_rank: {faults.stall_rank} is not a rank of this world of {world_size}")


def injected_lr_scale(faults: Faults, progress: Progress, journal: Journal, step: int) -> float:
    """`+debug.inject_spike_at=STEP`: that step's lr times `inject_lr_scale`, once in the run's life (the progress
    state remembers it, so neither the replay after the rollback nor a requeue injects it again)."""
    if step != faults.inject_spike_at or step in progress.injected:
        return 1.0
    progress.injected.append(step)
    journal.append("spike_injected", step, lr_scale=faults.inject_lr_scale, reason="+debug.inject_spike_at")
    return faults.inject_lr_scale


def stall_if_due(faults: Faults, run_dir: Path, dog: watchdog.Watchdog, rank: int, step: int) -> None:
    """`+debug.stall_at=STEP` on `+debug.stall_rank`: stop making progress before `step`, once in the run's life."""
    if watchdog.stall_due(run_dir, faults.stall_at, faults.stall_rank, rank, step):
        watchdog.stall_forever(run_dir, dog, step)


def perturb_after_resume(faults: Faults, model: nn.Module, say: Callable[[str], None]) -> None:
    """`+debug.perturb_resume=true`: scale every parameter by 1 + 2^-16 once the resume's fidelity check has passed,
    so the resume is inexact in a way only the losses show (`curry-train rehearse` must catch it). Not the RNG: no
    step draws from torch's RNG, so perturbing it would change nothing."""
    if not faults.perturb_resume:
        return
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 2**-16)
    say("curry-train: +debug.perturb_resume: parameters scaled by 1 + 2^-16 after loading: this resume is inexact")
