"""Carrying out `+init_from=SOURCE`: a new run whose initial parameters come from SOURCE (see `init_source.py` for
the kinds of source and the checks that run before the process group).

Each rank reads only its own shard: rows of a safetensors tensor through a memory-mapped slice, or DCP's resharding
of a checkpoint written on any world size. So `model=7b` never holds 7B parameters on one host. Only parameters
(and, with `init.optimizer=true`, a checkpoint's optimizer moments) are taken: step, schedule, data position and RNG
start fresh, as in any new run. A relaunch with `+resume=...` continues from the run's own checkpoints and never
reads SOURCE again (the loop calls `load_initial` only when there is no resume point).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import xxhash
from torch import nn
from torch.distributed.tensor import DTensor

from curry_train import distributed
from curry_train.config import Config, Launch
from curry_train.init_source import InitError, InitPlan, TensorRef, check_source
from curry_train.journal import Journal

DIGEST = "xxh3_64-rows"  # the journal's digest: see `_row_digest`


def prepare(cfg: Config, launch: Launch, env: distributed.Dist) -> InitPlan | None:
    """Before the run directory is touched (all ranks): the checked plan of a launch that will read the source and,
    for a checkpoint, its files checked against its manifest, each rank a share, so that a corrupt source is
    refused with nothing created."""
    plan = check_source(cfg, launch)
    if plan is not None:
        verify(plan, env.checkpoint_group)
    return plan


def verify(plan: InitPlan, group: dist.ProcessGroup) -> None:
    from curry_train.checkpoint.resume import verify_everywhere

    if plan.source.kind == "checkpoint" and not plan.verified:
        problems = verify_everywhere(plan.source.path, group)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise InitError(f"+init_from={plan.source.given}: checkpoint {plan.source.path}: {problems[0]}{more}")
    plan.verified = True


def load_initial(
    plan: InitPlan | None,
    cfg: Config,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    env: distributed.Dist,
    journal: Journal,
    print_line: Callable[[str], None],
) -> None:
    """Fill the freshly built, sharded model (and optimizer) from the source, the excluded parameters from the
    initialiser, and journal `init`. `plan` is None when the pre-flight expected a resume that found nothing to
    resume (`+resume=auto` on a run directory whose checkpoints are all damaged): the source is checked here."""
    started = time.perf_counter()
    plan = plan or check_source(cfg, Launch())
    assert plan is not None
    verify(plan, env.checkpoint_group)
    source = plan.source
    distributed.fill_initial(model, cfg.model, cfg.train.seed, plan.excluded)  # type: ignore[arg-type]
    if source.kind == "checkpoint":
        conversions = _load_checkpoint(plan, model, optimizer, env.checkpoint_group)
    else:
        conversions = _load_safetensors(plan, model)
    digest = _gather_digest(_row_digest(model, plan.loaded), env.checkpoint_group)
    params = dict(model.named_parameters())
    journal.append(
        "init",
        0,
        source=source.given,
        kind=source.kind,
        path=str(source.path.resolve()),
        source_step=source.step,
        loaded=len(plan.loaded),
        params=sum(params[name].numel() for name in plan.loaded),
        excluded=plan.excluded,
        tied_head=source.tied and "output.weight" in plan.loaded,
        optimizer=plan.optimizer,
        dtype=conversions,
        digest=digest,
        seconds=round(time.perf_counter() - started, 3),
    )
    print_line(
        f"curry-train: initialised from {source.given} ({source.kind}"
        + (f", step {source.step}" if source.step is not None else "")
        + f"): {len(plan.loaded)} tensors"
        + (f", {len(plan.excluded)} left to the initialiser" if plan.excluded else "")
        + (", the head from the tied embedding" if source.tied and "output.weight" in plan.loaded else "")
        + (", with its optimizer state" if plan.optimizer else "")
        + f"; {', '.join(f'{k}: {v}' for k, v in conversions.items())}"
    )


def _conversion(source_dtype: str, target: torch.dtype) -> str:
    ours = str(target).removeprefix("torch.")
    return ours if source_dtype == ours else f"{source_dtype} -> {ours}"


@torch.no_grad()
def _load_safetensors(plan: InitPlan, model: nn.Module) -> dict[str, int]:
    """Each rank reads its rows of each tensor (memory-mapped slices) and converts them to the parameter's dtype.
    Returns the conversions made, as 'bfloat16 -> float32' (or the dtype, when none) -> number of tensors."""
    from safetensors import safe_open

    handles: dict[Path, Any] = {}
    conversions: Counter[str] = Counter()
    params = dict(model.named_parameters())
    for name in plan.loaded:
        ref: TensorRef = plan.source.tensors[name]
        assert ref.file is not None
        if ref.file not in handles:
            handles[ref.file] = safe_open(str(ref.file), framework="pt")
        local, start, end = _local_rows(params[name])
        if end > start:
            rows = handles[ref.file].get_slice(ref.key)[start:end]
            local.copy_(rows.to(local.dtype))
        conversions[_conversion(ref.dtype, local.dtype)] += 1
    return dict(conversions)


def _local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """This rank's local shard of `param` and the [start, end) rows of the full tensor it holds."""
    if not isinstance(param, DTensor):
        return param.data, 0, param.shape[0]
    local = param.to_local()
    mesh = param.device_mesh
    start, end = distributed.shard_rows(param.shape[0], mesh.size(), mesh.get_local_rank())
    assert local.shape[0] == end - start, f"unexpected shard layout: {local.shape[0]} rows, expected {end - start}"
    return local, start, end


def _load_checkpoint(
    plan: InitPlan, model: nn.Module, optimizer: torch.optim.Optimizer, group: dist.ProcessGroup
) -> dict[str, int]:
    """DCP reads each rank's shard of the loaded parameters (any saved world size) and, with `init.optimizer`,
    their optimizer moments; the optimizer's hyperparameters stay the config's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    loaded = set(plan.loaded)
    params = {k: v for k, v in get_model_state_dict(model).items() if k in loaded}
    state: dict[str, Any] = {"model": params}
    optim = None
    if plan.optimizer:
        optim = get_optimizer_state_dict(model, optimizer)
        # Moments only: the param_groups (lr, betas, weight decay) are this run's config, not the source's.
        state["optim"] = {"state": {k: v for k, v in optim["state"].items() if k in loaded}}
    dcp.load(state, storage_reader=FileSystemReader(str(plan.source.path)), process_group=group)
    set_model_state_dict(model, params, options=StateDictOptions(strict=False))
    if optim is not None:
        set_optimizer_state_dict(model, optimizer, optim)
    conversions: Counter[str] = Counter()
    for name, param in model.named_parameters():
        if name in loaded:
            conversions[_conversion(plan.source.tensors[name].dtype, param.dtype)] += 1
    return dict(conversions)


def _row_digest(model: nn.Module, names: list[str]) -> int:
    """This rank's share of a digest of the loaded parameters that is the same on every world size: the sum,
    modulo 2**64, of an xxh3 of each row keyed by the parameter's name and the row's index, so ranks holding
    different rows add up to the same total. A fingerprint against accidents, like the checkpoint checksums."""
    total = 0
    params = dict(model.named_parameters())
    for name in names:
        local, start, end = _local_rows(params[name])
        if end == start:
            continue
        rows = local.detach().cpu().contiguous().view(torch.uint8).reshape(end - start, -1).numpy()
        key = xxhash.xxh3_64_intdigest(name.encode())
        for i in range(end - start):
            total += xxhash.xxh3_64_intdigest(rows[i], seed=(key + start + i) & 0xFFFFFFFFFFFFFFFF)
    return total & 0xFFFFFFFFFFFFFFFF


def _gather_digest(mine: int, group: dist.ProcessGroup) -> str:
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return f"{DIGEST}:{sum(everyone) & 0xFFFFFFFFFFFFFFFF:016x}"
