"""DCP save and load: every save is staged, planned on the training thread, and written by one long-lived writer.

A save has three parts, which `Checkpointer` drives on every rank:
  1. `SaveJob.start` (training thread): take each Stateful's state dict, point its tensors at staging buffers that
     are allocated once per run and reused (an asynchronous save; a synchronous one writes the live tensors while
     training waits), and plan the checkpoint with DCP's planner (two small collectives on the checkpoint group).
     The copies into the buffers (a `Snapshot`) are made while the next forward and backward run, and completed
     before the next `optimizer.step()`.
  2. the writer thread: completes the snapshot; DCP's `FileSystemWriter` then serialises this rank's files into
     the run's write buffer, which goes to disk with O_DIRECT (`_DirectFile`), and fsyncs each one; an xxh3-64
     checksum of every file is computed from the bytes as they are written (no second read), and deferred values
     (the fidelity digest) are computed from the staged copy here, off the training thread. No collective runs on
     this thread.
  3. `SaveJob.finish_metadata` (rank 0, after every rank reported its files durable): the `.metadata` file.
The files are ordinary DCP files: PyTorch's own tools read them.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import inspect
import mmap
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
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

from curry_train.checkpoint import checksum
from curry_train.checkpoint.manifest import FileEntry

_IMMUTABLE = (int, float, str, bytes, bool, type(None), torch.dtype, torch.device)


# --------------------------------------------------------------------------------------------------- staging


class Snapshot:
    """The copies of a staged save's tensors into its host buffers, made while the next forward and backward run.

    Parameters and optimizer state change only at `optimizer.step()`, so the copies need not hold up training until
    then: on CUDA they are issued at once on a side stream (device-to-host into pinned memory) and the update's
    stream waits for them on the device; on CPU the writer thread makes them (`take`) before it serialises, and
    the training thread waits for that (`wait`) just before the update. Measured on this project's 2-core CPU VMs
    the copy of a 342 MB shard took 0.06 s of the training thread's time when made in place.
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

    Fresh allocations copy at a fraction of the speed of reused ones (page faults on every new page; 0.7-1.9 GB/s
    against ~9 GB/s measured on this project's CPU machines), and on CUDA only pinned host memory copies at full
    speed. A buffer is reallocated only when its tensor changes shape or dtype (e.g. optimizer state created by the
    first step after a save).
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

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

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


# Direct I/O needs the memory, the file offset and the length of each write aligned to the device's logical block
# (512 bytes or 4 KiB); a page-aligned buffer whose size is a multiple of 4 KiB meets all three.
_ALIGN = 4096
CHUNK_BYTES = 32 << 20


class WriteBuffer:
    """The page-aligned buffer through which the writer sends a file's bytes to disk, allocated once per run."""

    def __init__(self, nbytes: int = CHUNK_BYTES) -> None:
        assert nbytes % _ALIGN == 0
        self._map = mmap.mmap(-1, nbytes)  # anonymous mappings are page-aligned
        self.view = memoryview(self._map)


class _DirectFile:
    """A new file written through `buffer` with O_DIRECT: the bytes go from the buffer to the device, not through
    the page cache, and a checksum of them is computed as they pass.

    Buffered writes of a checkpoint cost the writer the kernel's copy into the page cache and its allocation of
    those pages: measured on this project's CPU VMs, 0.9-1.2 s of system CPU for a 342 MB shard, against 0.06 s
    written directly (the copy into the buffer). That CPU is what an asynchronous save takes from training. The
    bytes of a checkpoint are not read again soon, so caching them only evicts pages training uses.

    Where the filesystem refuses O_DIRECT (EINVAL: tmpfs, some FUSE mounts), or `direct` is off, the same chunks
    are written through the page cache. `close()` writes the tail, truncates the block padding, fsyncs, closes."""

    def __init__(self, path: Path, buffer: WriteBuffer, direct: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        self.direct = direct and hasattr(os, "O_DIRECT")
        try:
            self.fd = os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o644)
        except OSError as err:
            if not self.direct or err.errno != errno.EINVAL:
                raise
            self.direct = False
            self.fd = os.open(path, flags, 0o644)
        self.buffer = buffer.view
        self.filled = 0  # bytes in the buffer not yet written
        self.nbytes = 0  # bytes written through this file
        self.digest = checksum.running()
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        size, done = len(self.buffer), 0
        while done < len(view):
            n = min(size - self.filled, len(view) - done)
            self.buffer[self.filled : self.filled + n] = view[done : done + n]
            self.filled += n
            done += n
            if self.filled == size:
                self._drain(size)
        self.nbytes += done
        return done

    def tell(self) -> int:
        return self.nbytes

    def flush(self) -> None:
        """Nothing: DCP flushes after every item, and the bytes leave in whole buffers (and at `close`)."""

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        """Write what is left, make the file durable and close it."""
        if self.closed:
            return
        try:
            if self.filled:
                # A direct write must be a whole number of blocks: write the padding too, then cut it off.
                padded = -(-self.filled // _ALIGN) * _ALIGN if self.direct else self.filled
                self._drain(padded)
                if padded != self.filled:
                    os.ftruncate(self.fd, self.nbytes)
            os.fsync(self.fd)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close without making durable (a failed write: the staging directory is discarded)."""
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def _drain(self, nbytes: int) -> None:
        """Write the first `nbytes` of the buffer at the file's current end."""
        done = 0
        while done < nbytes:
            try:
                done += os.write(self.fd, self.buffer[done:nbytes])
            except OSError as err:
                if not self.direct or err.errno != errno.EINVAL:
                    raise
                # The filesystem opened the file for direct I/O but refuses the write: go through the page cache.
                self.direct = False
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.filled = 0


class _ChecksummingFileSystem(FileSystem):
    """DCP's local filesystem; each data file this rank writes goes through the run's write buffer (`_DirectFile`)
    and is recorded with its size and checksum."""

    def __init__(self, buffer: WriteBuffer, direct: bool = True, full_disk: bool = False) -> None:
        super().__init__()
        self.buffer = buffer
        self.direct = direct
        self.entries: dict[str, FileEntry] = {}
        self.wrote_direct = True  # every data file bypassed the page cache
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
        stream = _DirectFile(path, self.buffer, self.direct)
        try:
            yield stream
            stream.close()  # DCP closes it inside the block (after its own fsync); closing twice is harmless
        finally:
            stream.abandon()
        entry = FileEntry(stream.nbytes, stream.digest.hexdigest())
        with self._lock:
            self.entries[path.name] = entry
            self.wrote_direct &= stream.direct


@contextmanager
def _without_zip_crc() -> Iterator[None]:
    """torch.save computes a CRC-32 of every record of its zip container, about half its CPU time; the manifest's
    checksum of each whole file (computed as it is written) covers the same bytes, and torch.load does not need it.
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
    """What one rank's writer reports: DCP's write results and the size and checksum of each file it wrote
    (fsynced)."""

    results: list[WriteResult]
    files: dict[str, FileEntry]
    seconds: float
    cpu_seconds: float  # the writer thread's CPU time (user and system): what it can take from training
    direct: bool  # every file bypassed the page cache (O_DIRECT)


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

    @property
    def staged(self) -> dict[str, Any]:
        """The state dict this job writes: the staged copy of an asynchronous save (complete once the snapshot is
        taken), the live state of a synchronous one."""
        return self.planner.root

    @classmethod
    def start(
        cls, state_dict: dict[str, Any], staging: Path, group: dist.ProcessGroup, fs: _ChecksummingFileSystem
    ) -> SaveJob:
        """Plan the save of `state_dict` (already staged, or live for a synchronous save) on every rank; `fs`
        (from `Writer.filesystem`) writes the files."""
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        writer = FileSystemWriter(staging, sync_files=True, single_file_per_rank=True, thread_count=1)
        writer.fs = fs
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
        if self.snapshot is not None:
            self.snapshot.take()
        with _without_zip_crc():
            future = self.writer.write_data(self.plan, self.planner)
            future.wait()
        fs = self.writer.fs
        assert isinstance(fs, _ChecksummingFileSystem)
        seconds, cpu = time.perf_counter() - started, time.thread_time() - cpu
        return Written(future.value(), dict(fs.entries), seconds, cpu, fs.wrote_direct)

    def finish_metadata(self, results: list[list[WriteResult]]) -> None:
        """Rank 0: write `.metadata` (fsynced by the writer) once every rank's data files are durable."""
        assert self.metadata is not None, "only rank 0 holds the global metadata"
        self.writer.finish(self.metadata, results)


class Writer:
    """The run's one writer thread and its write buffer: at most one save is written at a time, in order.

    `direct`: write data files with O_DIRECT where the filesystem allows it (`checkpoint.direct_io`)."""

    def __init__(self, direct: bool = True) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="curry-train-writer")
        self.buffer = WriteBuffer()
        self.direct = direct

    def filesystem(self, full_disk: bool = False) -> _ChecksummingFileSystem:
        """The filesystem a new save's DCP writer writes through (its files go through this writer's buffer)."""
        return _ChecksummingFileSystem(self.buffer, self.direct, full_disk)

    def submit(self, job: SaveJob) -> Future[Written]:
        job.future = self._pool.submit(job.write)
        return job.future

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
