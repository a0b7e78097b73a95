"""DCP save and load: every save is staged, planned on the training thread, and written by one long-lived writer.

A save has three parts, which `Checkpointer` drives on every rank:
  1. `SaveJob.start` (training thread): take each Stateful's state dict, copy its tensors into staging buffers that
     are allocated once per run and reused (an asynchronous save; a synchronous one writes the live tensors while
     training waits), and plan the checkpoint with DCP's planner (two small collectives on the checkpoint group).
  2. the writer thread: DCP's `FileSystemWriter` writes this rank's files and fsyncs each one; a CRC-32 of every
     file is computed from the bytes as they are written (no second read), and deferred values (the fidelity
     digest) are computed from the staged copy here, off the training thread. No collective runs on this thread.
  3. `SaveJob.finish_metadata` (rank 0, after every rank reported its files durable): the `.metadata` file.
The files are ordinary DCP files: PyTorch's own tools read them.
"""

from __future__ import annotations

import copy
import errno
import inspect
import io
import os
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.tensor import DTensor

from curry_train.checkpoint.store import FileEntry

_IMMUTABLE = (int, float, str, bytes, bool, type(None), torch.dtype, torch.device)


# --------------------------------------------------------------------------------------------------- staging


class Stager:
    """Host copies of a state dict's tensors, in buffers allocated on the first save and reused by every later one.

    Fresh allocations copy at a fraction of the speed of reused ones (page faults on every new page; 0.7-1.9 GB/s
    against ~9 GB/s measured on this project's CPU machines), and on CUDA only pinned host memory copies at full
    speed. A buffer is reallocated only when its tensor changes shape or dtype (e.g. optimizer state created by the
    first step after a save).
    """

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}
        self.allocations = 0  # buffers allocated so far: stays put across saves of the same state
        self.cuda = False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A copy of `state_dict` that later training steps cannot change (containers rebuilt, tensors copied)."""
        staged = self._copy(state_dict, "")
        if self.cuda:
            torch.cuda.synchronize()  # the non-blocking device-to-host copies are complete before training goes on
        return staged

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def _copy(self, obj: Any, path: str) -> Any:
        if isinstance(obj, DTensor):
            local = self._tensor(obj.to_local(), path)
            if obj.device_mesh.device_type == "cpu":
                return DTensor.from_local(
                    local, obj.device_mesh, obj.placements, run_check=False, shape=obj.shape, stride=obj.stride()
                )
            # from_local would move the host copy back to the mesh's device: keep the spec, wrap the host copy (as
            # torch's own staging does); DCP plans from the spec and writes the local tensor.
            return DTensor(local, obj._spec, requires_grad=False)
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, path)
        if isinstance(obj, dict):
            return {k: self._copy(v, f"{path}/{k}") for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            items = [self._copy(v, f"{path}/{i}") for i, v in enumerate(obj)]
            return type(obj)(items) if not hasattr(obj, "_fields") else type(obj)(*items)
        if isinstance(obj, _IMMUTABLE) or hasattr(obj, "resolve_for_save"):
            return obj
        return copy.deepcopy(obj)  # anything else may be mutated by the next step

    def _tensor(self, tensor: torch.Tensor, path: str) -> torch.Tensor:
        tensor = tensor.detach()
        buf = self.buffers.get(path)
        if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype or buf.stride() != tensor.stride():
            pin = tensor.is_cuda
            self.cuda |= pin
            buf = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu", pin_memory=pin)
            self.buffers[path] = buf
            self.allocations += 1
        buf.copy_(tensor, non_blocking=tensor.is_cuda)
        return buf


def to_state_dict(state: dict[str, Stateful | Any]) -> dict[str, Any]:
    """Each Stateful's state dict, as DCP would take it."""
    return {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state.items()}


# ------------------------------------------------------------------------------------------------- writing


class _Planner(DefaultSavePlanner):
    """DCP's default planner, plus deferred values: an object with `resolve_for_save(state_dict)` stands in for a
    value that is computed from the staged state only when the writer serialises it (off the training thread)."""

    def __init__(self, root: dict[str, Any]) -> None:
        super().__init__()
        self.root = root

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:  # noqa: A002 (DCP's parameter name)
        if write_item.type == WriteItemType.BYTE_IO and hasattr(object, "resolve_for_save"):
            object = object.resolve_for_save(self.root)
        return super().transform_object(write_item, object)


class _ChecksummingFile:
    """A binary file that computes the CRC-32 of what is written through it, so the checksum costs no re-read."""

    def __init__(self, raw: io.BufferedWriter) -> None:
        self.raw = raw
        self.crc = 0
        self.nbytes = 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        written = self.raw.write(view)
        self.crc = zlib.crc32(view, self.crc)
        self.nbytes += view.nbytes
        return written

    def tell(self) -> int:
        return self.raw.tell()

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        self.raw.close()

    @property
    def closed(self) -> bool:
        return self.raw.closed


class _ChecksummingFileSystem(FileSystem):
    """DCP's local filesystem, recording size and CRC-32 of every data file this rank writes."""

    def __init__(self, full_disk: bool = False) -> None:
        super().__init__()
        self.entries: dict[str, FileEntry] = {}
        self._lock = threading.Lock()
        self.full_disk = full_disk  # +debug.fail_save_at: the disk fills up as this rank writes its shard

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        path = Path(path)
        if mode != "wb" or not path.name.endswith(".distcp"):
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        if self.full_disk:
            path.write_bytes(b"\0" * 4096)  # what a write that runs out of space leaves: part of a file
            raise OSError(errno.ENOSPC, f"No space left on device (injected by +debug.fail_save_at): {path}")
        with path.open("wb") as raw:
            stream = _ChecksummingFile(raw)
            yield stream
        size = path.stat().st_size  # DCP's writer closes (after fsync) inside the block
        # Sequential writes only: the running CRC is the file's. Anything else (a writer that seeks) is re-read.
        entry = FileEntry(size, f"{stream.crc:08x}") if size == stream.nbytes else None
        with self._lock:
            self.entries[path.name] = entry if entry is not None else _file_entry(path)


def _file_entry(path: Path) -> FileEntry:
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(8 << 20):
            crc = zlib.crc32(block, crc)
    return FileEntry(path.stat().st_size, f"{crc:08x}")


@contextmanager
def _without_zip_crc() -> Iterator[None]:
    """torch.save computes a CRC-32 of every record of its zip container, about half its CPU time; the manifest's
    CRC-32 of each whole file (computed as it is written) covers the same bytes, and torch.load does not need it.
    The switch is process-wide: a torch.save elsewhere in the process meanwhile writes a zip without record CRCs,
    which torch.load reads all the same."""
    try:
        from torch.utils.serialization import config  # torch >= 2.6
    except ImportError:
        yield
        return
    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = before


@dataclass
class Written:
    """What one rank's writer reports: DCP's write results and the size and CRC-32 of each file it wrote (fsynced)."""

    results: list[WriteResult]
    files: dict[str, FileEntry]
    seconds: float
    cpu_seconds: float  # the writer thread's CPU time (user and system): what it can take from training


@dataclass
class SaveJob:
    """One save in progress on this rank."""

    staging: Path
    writer: FileSystemWriter
    planner: _Planner
    plan: SavePlan
    metadata: Metadata | None  # rank 0's, from the global plan
    future: Future[Written] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def start(
        cls, state_dict: dict[str, Any], staging: Path, group: dist.ProcessGroup, full_disk: bool = False
    ) -> SaveJob:
        """Plan the save of `state_dict` (already staged, or live for a synchronous save) on every rank."""
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        writer = FileSystemWriter(staging, sync_files=True, single_file_per_rank=True, thread_count=1)
        writer.fs = _ChecksummingFileSystem(full_disk)
        planner = _Planner(state_dict)
        planner.set_up_planner(state_dict=state_dict, storage_meta=writer.storage_meta(), is_coordinator=rank == 0)
        if "kwargs" in inspect.signature(writer.set_up_storage_writer).parameters:
            writer.set_up_storage_writer(rank == 0, rank=rank, use_collectives=True)
        else:
            writer.set_up_storage_writer(rank == 0)
        local = writer.prepare_local_plan(planner.create_local_plan())
        plans: list[Any] = [None] * world if rank == 0 else []
        dist.gather_object(local, plans if rank == 0 else None, dst=0, group=group)
        metadata = None
        scattered: list[Any] = [None]
        if rank == 0:
            try:
                global_plans, metadata = planner.create_global_plan(plans)
                out: list[Any] = writer.prepare_global_plan(global_plans)
            except Exception as err:  # every rank must leave the scatter: give them the error
                out = [err] * world
        dist.scatter_object_list(scattered, out if rank == 0 else None, src=0, group=group)
        if isinstance(scattered[0], Exception):
            raise scattered[0]
        return cls(staging, writer, planner, planner.finish_plan(scattered[0]), metadata)

    def write(self) -> Written:
        """This rank's files, each fsynced by DCP's writer before this returns (runs on the writer thread)."""
        started, cpu = time.perf_counter(), time.thread_time()
        with _without_zip_crc():
            future = self.writer.write_data(self.plan, self.planner)
            future.wait()
        fs = self.writer.fs
        assert isinstance(fs, _ChecksummingFileSystem)
        return Written(future.value(), dict(fs.entries), time.perf_counter() - started, time.thread_time() - cpu)

    def finish_metadata(self, results: list[list[WriteResult]]) -> None:
        """Rank 0: write `.metadata` (fsynced by the writer) once every rank's data files are durable."""
        assert self.metadata is not None, "only rank 0 holds the global metadata"
        self.writer.finish(self.metadata, results)


class Writer:
    """The run's one writer thread: at most one save is written at a time, in order."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="curry-train-writer")

    def submit(self, job: SaveJob) -> Future[Written]:
        job.future = self._pool.submit(job.write)
        return job.future

    def close(self) -> None:
        self._pool.shutdown(wait=True)


# ------------------------------------------------------------------------------------------------- loading


def load(state: dict[str, Stateful], path: Path, group: dist.ProcessGroup) -> None:
    """Load `state` in place from the DCP checkpoint at `path` (any world size: DCP reshards)."""
    dcp.load(state, storage_reader=FileSystemReader(path), process_group=group)
