"""Staging: the host copies an asynchronous save writes from, so that training can go on changing the live state.

The buffers are allocated on the first save and reused; the copies into them (a `Snapshot`) are made while the
next forward and backward run, and completed before the next `optimizer.step()`.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

_IMMUTABLE = (int, float, str, bytes, bool, type(None), torch.dtype, torch.device)


# --------------------------------------------------------------------------------------------------- staging


class Snapshot:
    """The copies of a staged save's tensors into its host buffers, made while the next forward and backward run.

    Parameters and optimizer state change only at `optimizer.step()`, so the copies need not hold up training until
    then: on CUDA they are issued at once on a side stream (device-to-host into pinned memory) and the update's
    stream waits for them on the device; on CPU the writer thread makes them (`take`) before it serialises, and
    the training thread waits for that (`wait`) just before the update. (What it costs: docs/performance.md.)
    """

    def __init__(self, copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.copies = copies  # (host buffer, source): the sources stay referenced until copied
        self.taken = threading.Event()
        self.event: torch.cuda.Event | None = None
        if any(src.is_cuda for _, src in copies):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())  # the sources as the finished step left them
            with torch.cuda.stream(stream):
                for dst, src in copies:
                    dst.copy_(src, non_blocking=True)
                    if src.is_cuda:
                        src.record_stream(stream)  # a temporary source is not reused before its copy is done
            self.event = stream.record_event()

    def take(self) -> None:
        """Writer thread: complete the copies (make them on CPU; wait for the device's on CUDA)."""
        try:
            if self.event is not None:
                self.event.synchronize()
            else:
                for dst, src in self.copies:
                    dst.copy_(src)
        finally:
            self.copies = []
            self.taken.set()

    def wait(self) -> None:
        """Training thread, before anything changes the saved tensors: the copies are (or, on CUDA, will be, in
        the device's order) complete."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)
        else:
            self.taken.wait()


class Stager:
    """Host copies of a state dict's tensors, in buffers allocated on the first save and reused by every later one.

    Fresh allocations copy at a fraction of the speed of reused ones (a page fault on every new page; figures in
    docs/performance.md), and on CUDA only pinned host memory copies at full speed. A buffer is reallocated only
    when its tensor changes shape or dtype (e.g. optimizer state created by the first step after a save).
    """

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}
        self.allocations = 0  # buffers allocated so far: stays put across saves of the same state

    def stage(self, state_dict: dict[str, Any]) -> tuple[dict[str, Any], Snapshot]:
        """A copy of `state_dict` that later training steps cannot change once its snapshot is taken: containers
        rebuilt and other values copied now, each tensor's copy into its buffer left to the returned snapshot."""
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        staged = self._copy(state_dict, "", copies)
        return staged, Snapshot(copies)

    def _copy(self, obj: Any, path: str, copies: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        if isinstance(obj, DTensor):
            local = self._tensor(obj.to_local(), path, copies)
            if obj.device_mesh.device_type == "cpu":
                return DTensor.from_local(
                    local, obj.device_mesh, obj.placements, run_check=False, shape=obj.shape, stride=obj.stride()
                )
            # from_local would move the host copy back to the mesh's device: keep the spec, wrap the host copy (as
            # torch's own staging does); DCP plans from the spec and writes the local tensor.
            return DTensor(local, obj._spec, requires_grad=False)
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, path, copies)
        if isinstance(obj, dict):
            return {k: self._copy(v, f"{path}/{k}", copies) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            items = [self._copy(v, f"{path}/{i}", copies) for i, v in enumerate(obj)]
            return type(obj)(items) if not hasattr(obj, "_fields") else type(obj)(*items)
        if isinstance(obj, _IMMUTABLE) or hasattr(obj, "resolve_for_save"):
            return obj
        return copy.deepcopy(obj)  # anything else may be mutated by the next step

    def _tensor(self, tensor: torch.Tensor, path: str, copies: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        tensor = tensor.detach()
        buf = self.buffers.get(path)
        if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype or buf.stride() != tensor.stride():
            pin = tensor.is_cuda
            buf = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu", pin_memory=pin)
            self.buffers[path] = buf
            self.allocations += 1
        copies.append((buf, tensor))
        return buf


def to_state_dict(state: dict[str, Stateful | Any]) -> dict[str, Any]:
    """Each Stateful's state dict, as DCP would take it."""
    return {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state.items()}
