"""Staging: the host copies an asynchronous save writes from, so that training can go on changing the live state.

The buffers are allocated on the first save and reused; the copies into them (a `Snapshot`) are made while the
next forward and backward run, and completed before the next `optimizer.step()`.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import itertools
import mmap
import os
import sys
import threading
import weakref
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Location:
    """Where a staging buffer's storage lies: its segment and byte range (what the writer process maps to see the
    same bytes)."""

    segment: int
    offset: int
    nbytes: int


class Segment:
    """Page-aligned host memory that holds staging buffers.

    Shared (`checkpoint.writer=process`): a memfd, so that the writer process maps the bytes the snapshot copies
    into and no copy crosses processes; its descriptor stays open while any buffer in it lives, to be sent again to
    a writer process that replaces a dead one. Private: an anonymous mapping, advised to use huge pages, so that
    faulting it in costs a 512th of the page faults. On CUDA it is registered as pinned memory (what
    `pin_memory=True` gives a private buffer), so that device-to-host copies into it run at full speed."""

    _ids = itertools.count()

    def __init__(self, nbytes: int, shared: bool, pin: bool) -> None:
        self.id = next(self._ids)
        self.nbytes = max(nbytes, 1)
        self.fd: int | None = None
        if shared:
            self.fd = os.memfd_create(f"curry-train-staging-{self.id}", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, self.nbytes)
            self.map = mmap.mmap(self.fd, self.nbytes)
            weakref.finalize(self, os.close, self.fd)
        else:
            self.map = mmap.mmap(-1, self.nbytes)
            with contextlib.suppress(AttributeError, OSError):  # huge pages are an optimisation, never required
                self.map.madvise(mmap.MADV_HUGEPAGE)
        self.address = torch.frombuffer(self.map, dtype=torch.uint8).data_ptr()
        if pin:
            cudart = torch.cuda.cudart()
            cudart.cudaHostRegister(self.address, self.nbytes, 0)
            weakref.finalize(self, cudart.cudaHostUnregister, self.address)

    def tensor(self, offset: int, nbytes: int, dtype: torch.dtype, shape: Any, stride: Any) -> torch.Tensor:
        """A tensor whose storage is exactly `nbytes` at `offset` of this segment (not a view of a larger storage:
        DCP's writer would copy such a view before serialising it)."""
        count = nbytes // dtype.itemsize
        return torch.frombuffer(self.map, dtype=dtype, count=count, offset=offset).as_strided(shape, stride)

    def populate(self, chunk: int = 32 << 20) -> None:
        """Fault every page in now, so that the first snapshot copy into it does not: page faults in a thread of the
        training process take the memory map's lock that the training thread's allocations need too. A chunk at a
        time (each madvise holds that lock in read mode while it runs), with the interpreter lock released:
        MADV_POPULATE_WRITE (Linux >= 5.14), else one write per page."""
        for start in range(0, self.nbytes, chunk):
            n = min(chunk, self.nbytes - start)
            advice = _MADV_POPULATE_WRITE
            if _LIBC is None or _LIBC.madvise(ctypes.c_void_p(self.address + start), ctypes.c_size_t(n), advice):
                pages = torch.frombuffer(self.map, dtype=torch.uint8, count=n, offset=start)
                pages[:: mmap.PAGESIZE].zero_()  # the buffer's values do not matter before its first copy


_MADV_POPULATE_WRITE = 23  # <linux/mman.h>; the mmap module of Python 3.11 does not name it
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


class Stager:
    """Host copies of a state dict's tensors, in buffers allocated on the first save (or by `reserve`, before it)
    and reused by every later one.

    Fresh allocations copy at a fraction of the speed of reused ones (a page fault on every new page; figures in
    docs/performance.md), and on CUDA only pinned host memory copies at full speed. A buffer is reallocated only
    when its tensor changes shape or dtype (e.g. optimizer state created by the first step after a save).

    The buffers a save allocates lie together in one `Segment` (on CUDA without `shared`: each its own pinned
    allocation). `shared`: the segments are shared memory, so that the writer process (`checkpoint.writer=process`)
    writes from the same bytes; `locate` says where a tensor is.
    """

    def __init__(self, shared: bool = False) -> None:
        self.shared = shared
        self.buffers: dict[str, torch.Tensor] = {}
        self.allocations = 0  # buffers allocated so far: stays put across saves of the same state
        self.segments: dict[int, Segment] = {}  # the segments some buffer still lies in
        self._where: dict[int, Location] = {}  # a buffer's storage address -> its location in a segment
        self._segment_of: dict[str, int] = {}  # buffer path -> segment id
        self._wrappers: dict[str, tuple[Any, DTensor]] = {}  # buffer path -> (its source's spec, the staged DTensor)
        self._populating: threading.Thread | None = None

    def reserve(self, state_dict: dict[str, Any]) -> None:
        """Allocate the buffers `state_dict` needs before its first save, and fault them in on a thread of their
        own while training goes on (the first `stage` waits for that)."""
        segment = self._allocate(state_dict)
        if segment is not None:
            self._populating = threading.Thread(target=segment.populate, name="curry-train-staging", daemon=True)
            self._populating.start()

    def stage(self, state_dict: dict[str, Any]) -> tuple[dict[str, Any], Snapshot]:
        """A copy of `state_dict` that later training steps cannot change once its snapshot is taken: containers
        rebuilt and other values copied now, each tensor's copy into its buffer left to the returned snapshot."""
        self.wait_populated()
        with torch.no_grad():  # (to_local without autograd's bookkeeping)
            try:  # every buffer there already (every save but a state's first): one walk of the state
                copies: list[tuple[torch.Tensor, torch.Tensor]] = []
                staged = self._copy(state_dict, "", copies, existing_only=True)
            except _Unstaged:
                self._allocate(state_dict)
                copies = []
                staged = self._copy(state_dict, "", copies)
        return staged, Snapshot(copies)

    def layout(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """What `stage` will return for `state_dict`, without its copies: what a save of it is planned from."""
        with torch.no_grad():
            return self._copy(state_dict, "", [])

    def wait_populated(self) -> None:
        """Until the buffers `reserve` allocated are faulted in."""
        if self._populating is not None:
            self._populating.join()
            self._populating = None

    def locate(self, tensor: torch.Tensor) -> Location | None:
        """Where `tensor`'s storage lies in a segment (None: not a staging buffer in one)."""
        return self._where.get(tensor.untyped_storage().data_ptr())

    def _allocate(self, state_dict: dict[str, Any]) -> Segment | None:
        """The buffers this state needs and lacks, together in one new segment (None: it lacks none)."""
        with torch.no_grad():
            tensors = list(_tensors(state_dict, ""))
        needed = [(p, t) for p, t in tensors if not self._fits(p, t) and self._segmented(t)]
        if not needed:
            return None
        spans, offset = [], 0
        for _, t in needed:
            nbytes = _storage_span(t) * t.element_size()
            spans.append((offset, nbytes))
            offset += -(-nbytes // 4096) * 4096  # page-aligned: each buffer starts where a copy runs fastest
        segment = Segment(offset, self.shared, pin=needed[0][1].is_cuda)
        for (path, t), (start, nbytes) in zip(needed, spans, strict=True):
            buf = segment.tensor(start, nbytes, t.dtype, t.shape, t.stride())
            self.buffers[path] = buf
            self.allocations += 1
            self._segment_of[path] = segment.id
            self._where[buf.untyped_storage().data_ptr()] = Location(segment.id, start, nbytes)
        self.segments[segment.id] = segment
        live = set(self._segment_of.values())
        for gone in set(self.segments) - live:  # every buffer in it was replaced: free it
            del self.segments[gone]
        self._where = {ptr: loc for ptr, loc in self._where.items() if loc.segment in live}
        return segment

    def _segmented(self, tensor: torch.Tensor) -> bool:
        """Whether `_allocate` gives this tensor a buffer in a segment (on CUDA, unshared: each its own pinned one)."""
        return tensor.numel() > 0 and (self.shared or not tensor.is_cuda)

    def _fits(self, path: str, tensor: torch.Tensor) -> bool:
        buf = self.buffers.get(path)
        return (
            buf is not None
            and buf.shape == tensor.shape
            and buf.dtype == tensor.dtype
            and (buf.stride() == tensor.stride())
        )

    def _copy(
        self, obj: Any, path: str, copies: list[tuple[torch.Tensor, torch.Tensor]], existing_only: bool = False
    ) -> Any:
        """`obj` with each tensor replaced by its buffer; `existing_only`: raise `_Unstaged` where a tensor that
        `_allocate` gives a buffer lacks one."""
        if isinstance(obj, DTensor):
            local = self._tensor(obj.to_local(), path, copies, existing_only)
            # The host copy under the source's spec (what DCP plans from), made once per buffer: from_local would
            # run an autograd function per tensor per save, and on CUDA would move the copy back to the device.
            spec = obj._spec
            cached = self._wrappers.get(path)
            if cached is None or cached[0] != spec or cached[1]._local_tensor is not local:
                cached = (spec, DTensor(local, spec, requires_grad=False))
                self._wrappers[path] = cached
            return cached[1]
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, path, copies, existing_only)
        if isinstance(obj, dict):
            return {k: self._copy(v, f"{path}/{k}", copies, existing_only) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            items = [self._copy(v, f"{path}/{i}", copies, existing_only) for i, v in enumerate(obj)]
            return type(obj)(items) if not hasattr(obj, "_fields") else type(obj)(*items)
        if isinstance(obj, _IMMUTABLE) or hasattr(obj, "resolve_for_save"):
            return obj
        return copy.deepcopy(obj)  # anything else may be mutated by the next step

    def _tensor(
        self, tensor: torch.Tensor, path: str, copies: list[tuple[torch.Tensor, torch.Tensor]], existing_only: bool
    ) -> torch.Tensor:
        tensor = tensor.detach()
        if not self._fits(path, tensor):  # (buffers in segments were allocated by _allocate: CUDA or empty ones here)
            if existing_only and self._segmented(tensor):
                raise _Unstaged(path)
            pin = tensor.is_cuda
            buf = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu", pin_memory=pin)
            self.buffers[path] = buf
            self._segment_of.pop(path, None)
            self.allocations += 1
        buf = self.buffers[path]
        copies.append((buf, tensor))
        return buf


class _Unstaged(Exception):
    """A tensor of the state being staged has no buffer yet (its path): `stage` allocates the missing ones."""


def _tensors(obj: Any, path: str) -> Any:
    """(path, local tensor) for every tensor `Stager._copy` stages, under the same paths."""
    if isinstance(obj, DTensor):
        yield path, obj.to_local().detach()
    elif isinstance(obj, torch.Tensor):
        yield path, obj.detach()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}/{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}/{i}")


def _storage_span(tensor: torch.Tensor) -> int:
    """Elements of storage a tensor of this shape and stride spans (offset 0)."""
    if tensor.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))


def to_state_dict(state: dict[str, Stateful | Any]) -> dict[str, Any]:
    """Each Stateful's state dict, as DCP would take it."""
    return {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state.items()}
