"""Process group, ranks, device and FSDP2 wrapping.

One code path for every launch: `python -m curry_train.train` runs as a world of one (gloo on CPU, NCCL on CUDA),
`torchrun` as a world of N, so the loop never branches on "distributed or not".
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from curry_train.config import Config, ModelConfig
from curry_train.heartbeat import name_ranks
from curry_train.model import Transformer, build_model, count_params, init_value


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh
    # Checkpointing gets a group of its own: an async DCP save issuing collectives on the default group while
    # FSDP trains on it deadlocks on gloo (two threads, one group).
    checkpoint_group: dist.ProcessGroup
    # Each rank's host name and the address its peers reach it at, to name the rank behind a lost connection.
    peers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def lost_peer(self, err: BaseException) -> str | None:
        """ "rank R on HOST (ADDR)" for the peer whose address gloo's error names, when one rank has it."""
        found = re.search(r"\[([0-9a-fA-F.:]+)\]:\d+", str(err))
        if found is None:
            return None
        ranks = [r for r, (_, addr) in enumerate(self.peers) if addr == found[1] and r != self.rank]
        return name_ranks(ranks, self.peers) if len(ranks) == 1 else None


def die_with_launcher() -> None:
    """Under torchrun, have the kernel SIGKILL this worker when its launcher dies.

    torchrun starts each worker in a session of its own, so a SIGKILL of torchrun (or of its process group) would
    leave the workers training and saving for minutes, beside the `+resume=latest` that replaces them. SIGKILL,
    not SIGTERM: with the launcher gone there is no job to save for, and an interrupted save is never visible.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() != parent:  # the launcher died before the request took effect
        os._exit(1)


def pick_device(preference: str) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto", collective_timeout_s: float | None = None) -> Dist:
    """The process group and the checkpoint group, whose collectives wait at most `collective_timeout_s` for a
    peer (the hang timeout, see watchdog.py) instead of gloo's 30 minutes or NCCL's 10."""
    device = pick_device(device_preference)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    timeout = None if collective_timeout_s is None else timedelta(seconds=collective_timeout_s)
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    group = dist.new_group(backend="gloo", timeout=timeout)
    peers: list[tuple[str, str]] = [("", "")] * world
    dist.all_gather_object(peers, (socket.gethostname(), own_address()), group=group)
    return Dist(rank, world, int(os.environ.get("LOCAL_RANK", 0)), device, mesh, group, peers)


def own_address() -> str:
    """The address this host reaches the rendezvous host from: the one its peers see its connections come from."""
    master = os.environ.get("MASTER_ADDR")
    if not master:
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((master, 9))  # UDP: no packet is sent, the kernel only picks the route
            return probe.getsockname()[0]
    except OSError:
        return master


def set_collective_timeout(seconds: float, groups: list[dist.ProcessGroup]) -> None:
    """Raise how long a collective may wait (the automatic hang timeout grew with a slow save): a collective must
    never time out on a wait the watchdog still counts as legitimate."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    for group in [None, *groups]:
        _set_pg_timeout(timedelta(seconds=seconds), group)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def use_bf16(cfg: Config, device: torch.device) -> bool:
    if cfg.train.mixed_precision == "auto":
        return device.type == "cuda"
    return cfg.train.mixed_precision == "bf16"


def build_sharded_model(cfg: Config, env: Dist, initialize: bool = True) -> tuple[Transformer, int]:
    """The model on meta, sharded, then materialised: no rank ever holds the whole unsharded model. Without
    `initialize` the parameters are left as allocated, for a resume that loads every one of them."""
    model = build_model(cfg.model)
    n_params = count_params(model)
    shard_model(model, env.mesh, use_bf16(cfg, env.device))
    materialize(model, cfg.model, env.device, cfg.train.seed, initialize)
    return model, n_params


def shard_model(model: nn.Module, mesh: DeviceMesh, mixed_precision: bool) -> nn.Module:
    """FSDP2: each block, then the root (embeddings, final norm, output)."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else None
    kwargs = {"mesh": mesh, "mp_policy": mp} if mp else {"mesh": mesh}
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


@torch.no_grad()
def materialize(model: Transformer, cfg: ModelConfig, device: torch.device, seed: int, initialize: bool = True) -> None:
    """Allocate the sharded parameters on `device` and fill each rank's shard of the initial values (not when a
    resume is about to overwrite every one of them: drawing 7B initial values takes minutes)."""
    model.to_empty(device=device)
    if initialize:
        fill_initial(model, cfg, seed)
    model.reset_rotary()


@torch.no_grad()
def fill_initial(model: Transformer, cfg: ModelConfig, seed: int, names: Collection[str] | None = None) -> None:
    """Each rank's shard of the initial values of the parameters `names` (every parameter when None)."""
    for name, param in model.named_parameters():
        if names is not None and name not in names:
            continue
        full = init_value(name, param.shape, cfg, seed)
        if isinstance(param, DTensor):
            local = param.to_local()
            shard = local_shard(full, param.device_mesh.size(), param.device_mesh.get_local_rank())
            local.copy_(shard.to(local.dtype))
        else:
            param.copy_(full)


def shard_rows(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of the dim-0 rows that `rank` holds under FSDP2's sharding (torch.chunk semantics: chunks of
    ceil(rows / world_size), so the last ranks may hold fewer rows or none)."""
    size = -(-rows // world_size)
    start = min(rank * size, rows)
    return start, min(start + size, rows)


def local_shard(full: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """This rank's piece of `full` under FSDP2's dim-0 sharding (possibly empty)."""
    start, end = shard_rows(full.shape[0], world_size, rank)
    return full[start:end]


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def agree(value: Any, group: dist.ProcessGroup) -> Any:
    """Rank 0's value (or the exception it raised), on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def on_rank0(is_main: bool, group: dist.ProcessGroup, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` run by rank 0 alone (it reads or changes the run directory); its result, or the exception it
    raised, on every rank, so that no rank is left waiting in a collective that rank 0 never reaches."""
    if not is_main:
        return agree(None, group)
    try:
        value = fn(*args)
    except Exception as err:
        value = err
    return agree(value, group)
