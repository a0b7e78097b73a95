"""What each role's checkpoint holds, as `Stateful` objects under fixed keys for DCP.

Keys of a checkpoint (each a top-level key of the DCP state dict):
    model       parameters (every role)
    optim       optimizer state (recovery; rollback with rollback_contents=full)
    progress    the harness's counters (every role): step, world size, the spike detector's loss window, where
                the optimizer state last started fresh, and the run's rollback history
    dataloader  the data position (every role): `cursor`, the global index of the next sample (a sample is a pure
                function of its index, so this is the whole position, on any world size or worker count), and
                `skipped`, the [start, end) sample ranges rollbacks skipped (a JSON list). Checkpoints written
                before this key existed hold both in `progress`; they still load (`legacy_layout`).
    scheduler   the schedule's position: step and the lr it gives (full state)
    rng         each rank's Python, NumPy and torch RNG states, under `rank<r>` (full state)
    fidelity    each rank's digest of its parameter shard and RNG states and the ids of its next batch, under
                `rank<r>` (full state): recomputed after a resume, a mismatch fails loudly

Per-rank states are pickled into one bytes object per rank: DCP keeps one copy of a non-tensor value per key,
so keying by rank is what keeps rank 1's data position from being overwritten by rank 0's.
"""

from __future__ import annotations

import itertools
import json
import pickle
import random
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from curry_train.checkpoint import checksum
from curry_train.checkpoint.policy import Contents

# Keys whose values belong to one layout of ranks: a resume on another world size leaves them out.
PER_RANK_KEYS = ("rng", "fidelity")
# The keys of a parameters-only checkpoint (`Contents.PARAMS`).
PARAMS_ONLY_KEYS = ("model", "progress", "dataloader")


@dataclass
class Progress:
    """The harness's own counters: with model, optimizer and RNG, everything that decides the next step.

    `step`, `cursor`, `skipped`, `loss_window` and `rewarm_from` describe the trajectory and go back with a rollback;
    `rollbacks` and `injected` are the run's history and never do (the cap on rollbacks counts them all).
    `cursor` and `skipped` are saved under `dataloader` (`data_state`), the rest under `progress` (`to_state`).
    """

    step: int = 0  # completed optimizer steps
    cursor: int = 0  # global index of the next sample: step s takes [cursor, cursor + batch_size)
    world_size: int = 1
    skipped: list[list[int]] = field(default_factory=list)  # [start, end) global sample ranges rollbacks skipped
    loss_window: list[float] = field(default_factory=list)  # the spike detector's baseline, newest last
    rewarm_from: int | None = None  # the step at which the optimizer state last started fresh
    rollbacks: list[dict[str, Any]] = field(default_factory=list)  # {"spike_step", "step"} of every rollback
    injected: list[int] = field(default_factory=list)  # +debug.inject_spike_at steps already injected

    _LISTS = ("loss_window", "rewarm_from", "rollbacks", "injected")

    def to_state(self, legacy: bool = False) -> dict[str, Any]:
        """The `progress` entry; `legacy`: the layout before `dataloader`, with the data position in it."""
        # Numbers stay numbers (PyTorch's tools show them); the lists travel as one JSON string, which every DCP
        # version stores as a plain object (floats round-trip exactly through repr).
        history = {name: getattr(self, name) for name in self._LISTS}
        if legacy:
            return {
                "step": self.step,
                "cursor": self.cursor,
                "world_size": self.world_size,
                "history": json.dumps({"skipped": self.skipped, **history}),
            }
        return {"step": self.step, "world_size": self.world_size, "history": json.dumps(history)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.step, self.world_size = int(state["step"]), int(state["world_size"])
        if "cursor" in state:  # the layout before `dataloader`
            self.cursor = int(state["cursor"])
        for name, value in json.loads(state["history"]).items():
            setattr(self, name, value)  # `skipped` too, in the layout before `dataloader`

    def data_state(self) -> dict[str, Any]:
        """The `dataloader` entry: the data position."""
        return {"cursor": self.cursor, "skipped": json.dumps(self.skipped)}

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.cursor, self.skipped = int(state["cursor"]), json.loads(state["skipped"])


class ProgressState(Stateful):
    """`progress`; `legacy`: in the layout of checkpoints written before `dataloader` (the cursor and skipped ranges
    in it), which is what loading such a checkpoint asks DCP for."""

    def __init__(self, progress: Progress, legacy: bool = False) -> None:
        self.progress = progress
        self.legacy = legacy

    def state_dict(self) -> dict[str, Any]:
        return self.progress.to_state(self.legacy)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.progress.load_state(state_dict)


class DataLoaderState(Stateful):
    """`dataloader`: the data position, as the harness defines it (the global sample cursor and the skipped
    ranges). Not `StatefulDataLoader`'s own state: that one is tied to a worker count and a world size, while a
    loader is rebuilt from the cursor on any of them."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def state_dict(self) -> dict[str, Any]:
        return self.progress.data_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.progress.load_data_state(state_dict)


class StateDictCache:
    """DCP's state dicts of a model and its optimizer, built without DCP's name resolution once DCP's own result
    showed what the names are.

    `get_model_state_dict` and `get_optimizer_state_dict` work every parameter's name out anew at each call: 12.6 ms
    of the training thread per save of model=small on a slow 2-vCPU VM, against 2.4 ms built here. Their results are
    the module's and optimizer's own state dicts under those names (detached parameters and buffers; the optimizer's
    per-parameter state and its hyperparameters). So the first call asks DCP, and keeps only the names, where the
    same dict built directly from the live model and optimizer is exactly DCP's (the same tensors, keys, order and
    values); later calls build it directly while the modules hold tensors of the same names and types (a sharded
    parameter is a DTensor) and the optimizer the same parameters, each with its state. Nothing but names is kept:
    every value is read live. Anything else (wrapped modules DCP names otherwise, tied weights, an unsharded model,
    an optimizer parameter without state yet, which DCP creates) is asked of DCP.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        self._model: tuple[tuple, list[str], type] | None = None  # (the modules' names and types, DCP's keys, its dict)
        self._optim: tuple[list[weakref.ref], tuple, dict[int, str], list[list[str]]] | None = None
        self.hits = 0  # calls answered without DCP

    def model_state_dict(self) -> dict[str, Any]:
        if self._model is not None:
            walk = self._walk()
            kinds, names, kind = self._model
            if _kinds(walk) == kinds:
                self.hits += 1
                live = dict(walk)
                return kind((name, live[name].detach()) for name in names)
        state = get_model_state_dict(self.model)
        walk = self._walk()  # after DCP's call, whose pre-save hooks may change what the modules hold (FSDP2 reshards)
        live = dict(walk)
        exact = all(name in live and _same_tensor(value, live[name]) for name, value in state.items())
        self._model = (_kinds(walk), list(state), type(state)) if exact else None
        return state

    def _walk(self) -> list[tuple[str, torch.Tensor]]:
        return list(itertools.chain(self.model.named_parameters(), self.model.named_buffers()))

    def optimizer_state_dict(self) -> dict[str, Any]:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self._reusable(params):
            self.hits += 1
            assert self._optim is not None
            return self._build(*self._optim[2:])
        result = get_optimizer_state_dict(self.model, self.optimizer)
        self._optim = None
        names = [list(group["params"]) for group in result["param_groups"]]
        if [len(n) for n in names] != [len(g["params"]) for g in self.optimizer.param_groups]:
            return result
        fqn = {id(p): name for p, name in zip(params, itertools.chain(*names), strict=True)}
        try:
            exact = _same_state_dict(self._build(fqn, names), result)
        except (KeyError, RuntimeError, TypeError, ValueError):  # a name it lacks; a value that is not a plain one
            exact = False
        if exact:
            self._optim = ([weakref.ref(p) for p in params], self._group_keys(), fqn, names)
        return result

    def _reusable(self, params: list[torch.Tensor]) -> bool:
        if self._optim is None:
            return False
        refs, group_keys = self._optim[:2]
        state = self.optimizer.state
        return (
            len(refs) == len(params)
            and all(r() is p for r, p in zip(refs, params, strict=True))
            and group_keys == self._group_keys()
            and len(state) == len(params)
            and all(p in state for p in params)
        )

    def _group_keys(self) -> tuple:
        return tuple(tuple(group) for group in self.optimizer.param_groups)

    def _build(self, fqn: dict[int, str], names: list[list[str]]) -> dict[str, Any]:
        """What `Optimizer.state_dict()` holds, under DCP's names (its order: the state's, then each group's keys
        with `params` last)."""
        groups = [
            {**{k: v for k, v in group.items() if k != "params"}, "params": list(group_names)}
            for group, group_names in zip(self.optimizer.param_groups, names, strict=True)
        ]
        return {"state": {fqn[id(p)]: s for p, s in self.optimizer.state.items()}, "param_groups": groups}


def _kinds(walk: list[tuple[str, torch.Tensor]]) -> tuple:
    """The modules' tensors' names and types: a sharded parameter is a DTensor, an unsharded one is not."""
    return tuple((name, type(t)) for name, t in walk)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def _same_tensor(view: Any, tensor: torch.Tensor) -> bool:
    """`view` shows exactly `tensor`'s bytes, as the detached tensor DCP's state dict holds for it."""
    if not isinstance(view, torch.Tensor) or isinstance(view, DTensor) != isinstance(tensor, DTensor):
        return False
    a, b = _local(view), _local(tensor)
    return (
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and not view.requires_grad
    )


def _same_state_dict(built: dict[str, Any], dcp: dict[str, Any]) -> bool:
    """`built` is `dcp`: the same keys in the same order, the same tensor objects, equal plain values."""
    if list(built) != list(dcp) or list(built["state"]) != list(dcp["state"]):
        return False
    for name, values in dcp["state"].items():
        mine = built["state"][name]
        if list(mine) != list(values) or any(
            mine[k] is not v and (isinstance(v, torch.Tensor) or mine[k] != v) for k, v in values.items()
        ):
            return False
    return [list(g) for g in built["param_groups"]] == [list(g) for g in dcp["param_groups"]] and bool(
        built["param_groups"] == dcp["param_groups"]
    )


class ModelState(Stateful):
    def __init__(self, model: nn.Module, cache: StateDictCache | None = None) -> None:
        self.model = model
        self.cache = cache

    def state_dict(self) -> dict[str, Any]:
        return self.cache.model_state_dict() if self.cache is not None else get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=True))


class OptimState(Stateful):
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cache: StateDictCache | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.cache = cache

    def state_dict(self) -> dict[str, Any]:
        if self.cache is not None:
            return self.cache.optimizer_state_dict()
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


class DictState(Stateful):
    """A flat dict of numbers shared by all ranks (the progress counters, the schedule position)."""

    def __init__(self, values: dict[str, int | float]) -> None:
        self.values = values

    def state_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.values.update(state_dict)


class PerRankState(Stateful):
    """One rank's opaque state, pickled under `rank<r>` so every rank keeps its own."""

    def __init__(self, rank: int, get: Callable[[], Any], put: Callable[[Any], None]) -> None:
        self.key = f"rank{rank}"
        self.get = get
        self.put = put

    def state_dict(self) -> dict[str, Any]:
        return {self.key: pickle.dumps(self.get())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.put(pickle.loads(state_dict[self.key]))


def capture_rng(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# The parameter digest of records written before digests named their algorithm.
_UNTAGGED = "sha256_16"


def rng_digest(device: torch.device) -> str:
    """A fingerprint of this rank's RNG states, for the resume-fidelity check (16 hex digits of SHA-256: a few KB,
    and the format every record has)."""
    h = checksum.running(_UNTAGGED)
    for name, value in capture_rng(device).items():
        h.update(name.encode())
        # A pickled tensor's bytes differ between equal tensors; hash the tensor's contents instead.
        h.update(value.cpu().numpy().tobytes() if isinstance(value, torch.Tensor) else pickle.dumps(value))
    return h.hexdigest()


def _digest(named: Any, algorithm: str = checksum.DEFAULT) -> str:
    """`algorithm:hex` over names and bytes (bare hex for `_UNTAGGED`, as those records wrote it); the prefix lets a
    later version check a record with its algorithm."""
    h = checksum.running(algorithm)
    for name, tensor in named:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        h.update(name.encode())
        # Hashed through the buffer protocol: the same bytes as a copy would give, without the copy.
        h.update(local.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest() if algorithm == _UNTAGGED else f"{algorithm}:{h.hexdigest()}"


def digest_algorithm(record: dict[str, Any]) -> str:
    """The algorithm of a saved fidelity record's parameter digest (records without a prefix used SHA-256)."""
    algorithm, sep, _ = str(record.get("params", "")).partition(":")
    return algorithm if sep else _UNTAGGED


@torch.no_grad()
def param_digest(model: nn.Module, algorithm: str = checksum.DEFAULT) -> str:
    """A fingerprint of the bytes of this rank's parameter shards (bitwise: any flipped bit changes it)."""
    return _digest(model.named_parameters(), algorithm)


def fidelity_record(
    model: nn.Module, device: torch.device, next_indices: list[int], algorithm: str = checksum.DEFAULT
) -> dict[str, Any]:
    """This rank's parameter digest (with `algorithm`: a saved record's), RNG digest and next batch."""
    return {"params": param_digest(model, algorithm), "rng": rng_digest(device), "next_indices": list(next_indices)}


class DeferredFidelity:
    """This rank's fidelity record in a state dict being saved, with the parameter digest left to the writer.

    The digest hashes every parameter shard; computed at `state_dict()` time it would cost the training thread a
    pass over the parameters on every full save, and one more, uselessly, when `dcp.load` collects state dicts to
    load into. The writer resolves it from the state being written (the staged copy of an asynchronous save), whose
    `model` entries are the same shards, under the same names, as `model.named_parameters()` gives after a load.
    """

    def __init__(self, param_names: list[str], rng: str, next_indices: list[int]) -> None:
        self.param_names = param_names
        self.rng = rng
        self.next_indices = next_indices

    def resolve_for_save(self, state_dict: dict[str, Any]) -> bytes:
        model = state_dict["model"]
        params = _digest((name, model[name]) for name in self.param_names)
        return pickle.dumps({"params": params, "rng": self.rng, "next_indices": self.next_indices})


class FidelityState(Stateful):
    """The fidelity record under `rank<r>`: written deferred, loaded into `put` for the check after a resume."""

    def __init__(
        self, rank: int, model: nn.Module, device: torch.device, next_indices: Callable[[], list[int]], put: Callable
    ) -> None:
        self.key = f"rank{rank}"
        self.model = model
        self.device = device
        self.next_indices = next_indices
        self.put = put

    def state_dict(self) -> dict[str, Any]:
        names = [name for name, _ in self.model.named_parameters()]
        return {self.key: DeferredFidelity(names, rng_digest(self.device), list(self.next_indices()))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.put(pickle.loads(state_dict[self.key]))


def app_state(
    contents: Contents,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: Progress,
    scheduler: dict[str, int | float],
    rank: int,
    device: torch.device,
    fidelity: tuple[Callable[[], list[int]], Callable[[dict[str, Any]], None]] | None = None,
    cache: StateDictCache | None = None,
) -> dict[str, Stateful]:
    """The DCP state dict of a checkpoint with `contents`: Stateful objects that DCP saves and loads in place.

    `fidelity`: where the next batch starts (its sample indices) and where a loaded fidelity record goes; `cache`:
    the model's and optimizer's state dicts of earlier calls, reused while they hold the live tensors."""
    state: dict[str, Stateful] = {  # PARAMS_ONLY_KEYS
        "model": ModelState(model, cache),
        "progress": ProgressState(progress),
        "dataloader": DataLoaderState(progress),
    }
    if contents is Contents.FULL:
        state["optim"] = OptimState(model, optimizer, cache)
        state["scheduler"] = DictState(scheduler)
        state["rng"] = PerRankState(rank, lambda: capture_rng(device), lambda s: restore_rng(s, device))
        if fidelity is not None:
            state["fidelity"] = FidelityState(rank, model, device, *fidelity)
    return state


def legacy_layout(state: dict[str, Stateful]) -> dict[str, Stateful]:
    """`state` as a checkpoint written before `dataloader` holds it (the data position inside `progress`), to load
    one: DCP loads exactly the keys asked for and fails on a key the checkpoint lacks."""
    state = dict(state)
    data = state.pop("dataloader", None)
    if isinstance(data, DataLoaderState):
        state["progress"] = ProgressState(data.progress, legacy=True)
    return state


@dataclass
class TrainState:
    """This rank's training state, as checkpoints save and load it: the model, the optimizer, the harness's
    counters and the schedule's position. `state(contents)` is the DCP state dict of a checkpoint with `contents`;
    a resume or a rollback loads into it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    progress: Progress
    rank: int
    device: torch.device
    next_indices: Callable[[int], list[int]]  # this rank's sample ids of the batch at a global sample cursor
    schedule: dict[str, int | float] = field(default_factory=lambda: {"step": 0, "lr": 0.0})  # saved as `scheduler`
    saved_fidelity: dict[str, Any] = field(default_factory=dict)  # filled by loading a full checkpoint

    def __post_init__(self) -> None:
        self.state_dicts = StateDictCache(self.model, self.optimizer)

    def state(self, contents: Contents) -> dict[str, Stateful]:
        fidelity = (lambda: self.next_indices(self.progress.cursor), self.saved_fidelity.update)
        return app_state(
            contents,
            self.model,
            self.optimizer,
            self.progress,
            self.schedule,
            self.rank,
            self.device,
            fidelity,
            self.state_dicts,
        )

    def fidelity_now(self, algorithm: str) -> dict[str, Any]:
        """This rank's fidelity record now, its parameters digested with `algorithm` (a saved record's)."""
        return fidelity_record(self.model, self.device, self.next_indices(self.progress.cursor), algorithm)
