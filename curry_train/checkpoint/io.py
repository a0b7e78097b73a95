"""DCP save and load: every save is staged (`staging`), planned on the training thread, and written by one
long-lived writer through the file layer (`files`).

A save has three parts, which `Checkpointer` drives on every rank:
  1. `SaveJob.start` (training thread): take each Stateful's state dict, point its tensors at staging buffers that
     are allocated once per run and reused (an asynchronous save; a synchronous one writes the live tensors while
     training waits), and plan the checkpoint with DCP's planner (two small collectives on the checkpoint group).
     The copies into the buffers (a `Snapshot`) are made while the next forward and backward run, and completed
     before the next `optimizer.step()`.
  2. the writer thread: completes the snapshot; DCP's `FileSystemWriter` then serialises this rank's files into
     the run's write buffer, which goes to disk with O_DIRECT (`DirectFile`), and fsyncs each one; an xxh3-64
     checksum of every file is computed from the bytes as they are written (no second read), and deferred values
     (the fidelity digest) are computed from the staged copy here, off the training thread. No collective runs on
     this thread.
  3. `SaveJob.finish_metadata` (rank 0, after every rank reported its files durable): the `.metadata` file.
The files are ordinary DCP files: PyTorch's own tools read them.
"""

from __future__ import annotations

import copy
import inspect
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.tensor import DTensor

from curry_train.checkpoint.files import ChecksummingFileSystem, WriteBuffer, without_zip_crc
from curry_train.checkpoint.manifest import FileEntry
from curry_train.checkpoint.staging import Snapshot

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


@dataclass(frozen=True)
class _CachedPlan:
    local: SavePlan  # this rank's local plan, as DCP's storage writer prepared it
    plan: SavePlan  # this rank's final plan
    metadata: Metadata | None  # rank 0's global metadata (its storage data is filled in by each save's `finish`)


class PlanCache:
    """DCP's save plans by the structure of the state they were made for: every key, and each tensor's dtype,
    shape, stride and sharding (the values of other entries do not enter a plan). A save whose structure every
    rank has planned before takes that plan; one all-reduce tells whether all of them have."""

    def __init__(self, size: int = 4) -> None:
        self.size = size  # a full save and its parameters-only best-K are two structures; a rollback may add one
        self.plans: dict[tuple, _CachedPlan] = {}
        self.hits = 0
        self.misses = 0

    def lookup(self, flat: dict[str, Any], group: dist.ProcessGroup) -> _CachedPlan | None:
        """The cached plan for the flattened state `flat`, if every rank of `group` has one (a collective)."""
        cached = self.plans.get(_structure(flat))
        missing = torch.tensor([int(cached is None)], dtype=torch.int32)
        dist.all_reduce(missing, op=dist.ReduceOp.MAX, group=group)
        if missing.item():
            self.misses += 1
            return None
        self.hits += 1
        return cached

    def store(self, flat: dict[str, Any], cached: _CachedPlan) -> None:
        if len(self.plans) >= self.size:
            self.plans.pop(next(iter(self.plans)))
        self.plans[_structure(flat)] = cached


def _structure(flat: dict[str, Any]) -> tuple:
    """What DCP's plan of a flattened state dict depends on (its planner flattens it as it plans)."""
    out = []
    for fqn, value in flat.items():
        if isinstance(value, DTensor):
            local = value._local_tensor  # (`to_local()` with grad enabled is an autograd call: 3 x the time)
            # The mesh's shape, not `mesh.mesh.shape`: torch 2.13 builds that tensor anew on every access (a third of
            # a save's blocking time, 225 tensors of model=small).
            spec = (tuple(value.shape), str(value.placements), tuple(value.device_mesh.shape))
            out.append((fqn, "D", value.dtype, tuple(local.shape), local.stride(), spec))
        elif isinstance(value, torch.Tensor):
            out.append((fqn, "T", value.dtype, tuple(value.shape), value.stride(), value.requires_grad))
        else:
            out.append((fqn, "O"))
    return tuple(out)


def plan_ahead(state_dict: dict[str, Any], group: dist.ProcessGroup, cache: PlanCache) -> None:
    """Plan a save of `state_dict` (as it will be staged) into `cache` on every rank before the first save, so that
    the first save's blocking part is what every later one's is (0.030 against 0.012 s for model=small)."""
    with tempfile.TemporaryDirectory(prefix="curry-train-plan-") as scratch:  # DCP's writer makes its directory
        writer, planner = _set_up(state_dict, Path(scratch), group)
        cache.store(planner.state_dict, _plan(writer, planner, group))


def _set_up(state_dict: dict[str, Any], staging: Path, group: dist.ProcessGroup) -> tuple[FileSystemWriter, _Planner]:
    rank = dist.get_rank(group)
    writer = FileSystemWriter(staging, sync_files=True, single_file_per_rank=True, thread_count=1)
    planner = _Planner(state_dict)
    planner.set_up_planner(state_dict=state_dict, storage_meta=writer.storage_meta(), is_coordinator=rank == 0)
    if "kwargs" in inspect.signature(writer.set_up_storage_writer).parameters:
        writer.set_up_storage_writer(rank == 0, rank=rank, use_collectives=True)
    else:
        writer.set_up_storage_writer(rank == 0)
    return writer, planner


def _plan(writer: FileSystemWriter, planner: _Planner, group: dist.ProcessGroup) -> _CachedPlan:
    """DCP's planning: every rank's local plan to rank 0, which makes the global plan and scatters each its part."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
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
    return _CachedPlan(local, planner.finish_plan(scattered[0]), metadata)


@dataclass
class Written:
    """What one rank's writer reports: DCP's write results and the size and checksum of each file it wrote
    (fsynced)."""

    results: list[WriteResult]
    files: dict[str, FileEntry]
    seconds: float
    cpu_seconds: float  # the writer's CPU time (user and system), in the training process and in a writer process
    direct: bool  # every file bypassed the page cache (O_DIRECT)
    process_cpu_seconds: float = 0.0  # the part of cpu_seconds a writer process spent (off the training process)


@dataclass
class SaveJob:
    """One save in progress on this rank."""

    staging: Path
    writer: FileSystemWriter
    planner: _Planner
    plan: SavePlan
    metadata: Metadata | None  # rank 0's, from the global plan
    future: Future[Written] | None = None
    snapshot: Snapshot | None = None  # an asynchronous save's copies, completed first thing on the writer thread
    kill_writer: bool = False  # +debug.kill_writer_at: the writer process is killed while it writes this job

    @property
    def staged(self) -> dict[str, Any]:
        """The state dict this job writes: the staged copy of an asynchronous save (complete once the snapshot is
        taken), the live state of a synchronous one."""
        return self.planner.root

    @classmethod
    def start(
        cls,
        state_dict: dict[str, Any],
        staging: Path,
        group: dist.ProcessGroup,
        fs: ChecksummingFileSystem,
        cache: PlanCache | None = None,
    ) -> SaveJob:
        """Plan the save of `state_dict` (already staged, or live for a synchronous save) on every rank; `fs`
        (from `Writer.filesystem`) writes the files. With a `cache`, a state whose structure every rank saved before
        (or planned ahead: `plan_ahead`) reuses that plan: one tiny all-reduce instead of DCP's planning and its two
        object collectives."""
        writer, planner = _set_up(state_dict, staging, group)
        writer.fs = fs
        if cache is not None:
            cached = cache.lookup(planner.state_dict, group)
            if cached is not None:
                writer.prepare_local_plan(cached.local)  # creates the staging directory
                metadata = copy.copy(cached.metadata)  # `finish` fills in this save's storage data
                return cls(staging, writer, planner, planner.finish_plan(cached.plan), metadata)
        planned = _plan(writer, planner, group)
        if cache is None:
            return cls(staging, writer, planner, planned.plan, planned.metadata)
        cache.store(planner.state_dict, planned)
        return cls(staging, writer, planner, planned.plan, copy.copy(planned.metadata))

    def write(self) -> Written:
        """This rank's files, each fsynced by DCP's writer before this returns (runs on the writer thread)."""
        started, cpu = time.perf_counter(), time.thread_time()
        if self.snapshot is not None:
            self.snapshot.take()
        with without_zip_crc():
            future = self.writer.write_data(self.plan, self.planner)
            future.wait()
        fs = self.writer.fs
        assert isinstance(fs, ChecksummingFileSystem)
        seconds, cpu = time.perf_counter() - started, time.thread_time() - cpu
        return Written(future.value(), dict(fs.entries), seconds, cpu, fs.wrote_direct)

    def finish_metadata(self, results: list[list[WriteResult]]) -> None:
        """Rank 0: write `.metadata` (fsynced by the writer) once every rank's data files are durable."""
        assert self.metadata is not None, "only rank 0 holds the global metadata"
        self.writer.finish(self.metadata, results)


def check_reported(staging: Path, reported: dict[str, Any]) -> None:
    """Rank 0 commits what the ranks report they wrote, checked against what it sees and what DCP's `.metadata`
    references: on nodes that do not share `run.root`, rank 0 would otherwise commit a checkpoint without the other
    nodes' shards, and retention would then delete the good ones."""
    seen = {p.name for p in staging.iterdir()}
    unseen = sorted(set(reported) - seen)
    if unseen:
        raise RuntimeError(
            f"rank 0 does not see {unseen[0]} ({len(unseen)} file(s) in all) that another rank wrote into {staging}: "
            "run.root must be a filesystem every node shares"
        )
    referenced = {info.relative_path for info in FileSystemReader(str(staging)).read_metadata().storage_data.values()}
    unreported = sorted(referenced - set(reported))
    if unreported:
        raise RuntimeError(f"{staging / '.metadata'} references {unreported[0]}, which no rank reported writing")


class Writer:
    """The run's one writer thread and its write buffer: at most one save is written at a time, in order.

    `direct`: write data files with O_DIRECT where the filesystem allows it (`checkpoint.direct_io`)."""

    def __init__(self, direct: bool = True) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="curry-train-writer")
        self.buffer = WriteBuffer()
        self.direct = direct

    def filesystem(self, full_disk: bool = False) -> ChecksummingFileSystem:
        """The filesystem a new save's DCP writer writes through (its files go through this writer's buffer)."""
        return ChecksummingFileSystem(self.buffer, self.direct, full_disk)

    def submit(self, job: SaveJob) -> Future[Written]:
        job.future = self._pool.submit(job.write)
        return job.future

    def prepare(self) -> None:
        """Nothing to do ahead of the first save (`ProcessWriter.prepare` maps the staging segments)."""

    def close(self) -> None:
        self._pool.shutdown(wait=True)


# ------------------------------------------------------------------------------------------------- loading


def saved_keys(path: Path) -> set[str]:
    """The top-level keys of the DCP checkpoint at `path` (`model`, `optim`, `dataloader`, ...), from its
    `.metadata`: no tensor is read."""
    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {fqn.split(".", 1)[0] for fqn in metadata}


def load(state: dict[str, Stateful], path: Path, group: dist.ProcessGroup) -> None:
    """Load `state` in place from the DCP checkpoint at `path` (any world size: DCP reshards)."""
    dcp.load(state, storage_reader=FileSystemReader(path), process_group=group)
