"""The asynchronous save's writer in a process of its own (`checkpoint.writer=process`), so that serialising and
writing a checkpoint does not hold the training process's interpreter lock.

The staging buffers lie in shared memory (`staging.Segment`); the writer process maps each segment once. Per
save, a thread of the training process completes the snapshot copies into those buffers (on CPU: `copy_` releases
the interpreter lock for the copy), then sends a small message: the plan (once per plan, then its number), where
each tensor item's bytes lie, the other values of the state (small objects; a deferred value such as the fidelity
digest is resolved in the writer process, from the shared buffers) and the staging directory. The writer process
runs DCP's `FileSystemWriter.write_data` on that plan through the same file layer (`ChecksummingFileSystem`:
O_DIRECT, xxh3 as the bytes pass, fsync), so its files have the writer thread's layout and every tensor's bytes at
the same offsets (pickled values may differ where torch.save records a memory address, as two saves of the thread
writer do), and answers with the same `io.Written`.

A writer process that dies fails the save it was writing (`WriterDied`), never hangs it; the next save starts a new
one. It dies with the training process (PR_SET_PDEATHSIG, and it stops when its socket closes), and it ignores the
stop signals: the training process decides what a stop means, and finishes (or abandons) the save itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import io as bytes_io
import mmap
import os
import pickle
import resource
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.planner import SavePlan, WriteItemType
from torch.distributed.tensor import DTensor

from curry_train.checkpoint.files import ChecksummingFileSystem, WriteBuffer, without_zip_crc
from curry_train.checkpoint.io import SaveJob, Written
from curry_train.checkpoint.staging import Location, Stager

_POLL_S = 0.5  # how often a wait for the writer process looks whether it is still alive
# The writer process's first statements: the stop signals are ignored before anything is imported (torch takes a
# second or more), and the module runs under its own name, so the message classes unpickle to its.
_BOOT = (
    "import signal\n"
    "for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP): signal.signal(s, signal.SIG_IGN)\n"
    "from curry_train.checkpoint.writer_process import main\n"
    "main()\n"
)


class WriterDied(RuntimeError):
    """The writer process ended while a save was in its hands: that save is lost (its staging directory is
    discarded), every committed checkpoint is intact, and the next save starts a new writer process."""


@dataclass(frozen=True)
class _Tensor:
    """Where a tensor item's bytes lie in shared memory, and the view of them DCP's planner resolves it to."""

    where: Location
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int

    def view(self, segments: dict[int, Any]) -> torch.Tensor:
        """The same view, in this process's mapping of the segment (its storage: exactly the buffer's bytes)."""
        count = self.where.nbytes // self.dtype.itemsize
        segment = segments[self.where.segment].map
        storage = torch.frombuffer(segment, dtype=self.dtype, count=count, offset=self.where.offset)
        return storage.as_strided(self.shape, self.stride, self.storage_offset)


@dataclass
class _Job:
    """One save, as the writer process needs it (pickled: a few kilobytes once the plan is known)."""

    staging: str
    plan_id: int
    plan: SavePlan | None  # None: the writer process has this plan from an earlier save
    tensors: list[_Tensor | torch.Tensor | None]  # per plan item (None for a byte item); a tensor is sent by value
    objects: dict[str, Any]  # byte items' values by fully qualified name
    local_state: Any  # the state's tensors (this rank's shards) for deferred values; None when there are none
    direct: bool
    full_disk: bool


class ProcessWriter:
    """A writer with `io.Writer`'s interface whose jobs are written by a long-lived process of this rank, started
    when the writer is made (its start, an interpreter importing torch, overlaps the run's own) and again after it
    died. Jobs are taken one at a time, in order, by one thread of the training process that makes the snapshot
    copies, sends the job and waits for the answer."""

    def __init__(self, stager: Stager, direct: bool = True) -> None:
        assert stager.shared, "the process writer reads the staging buffers from shared memory"
        self.stager = stager
        self.direct = direct
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="curry-train-writer")
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._ready = False
        self._sent_segments: set[int] = set()
        self._plans: dict[int, tuple[SavePlan, int]] = {}  # id(plan) -> (plan, its number in the writer process)
        self._next_plan = 0
        self.starts = 0  # writer processes started so far
        self.by_value = 0  # tensors sent through the socket (empty ones), not read from shared memory
        self._start()

    def filesystem(self, full_disk: bool = False) -> ChecksummingFileSystem:
        """The filesystem of a new save's DCP writer in this process (the staging directory and rank 0's
        `.metadata`); its data files are written by the writer process, with `direct` and `full_disk` as here."""
        return ChecksummingFileSystem(WriteBuffer(4096), self.direct, full_disk)

    def submit(self, job: SaveJob) -> Future[Written]:
        job.future = self._pool.submit(self._write, job)
        return job.future

    def prepare(self) -> None:
        """The staging segments `Stager.reserve` allocated, sent to the writer process once they are faulted in (it
        maps them with their page tables filled: its first save does not fault them in either), from the writer's
        thread."""
        self._pool.submit(self._prepare)

    def _prepare(self) -> None:
        self.stager.wait_populated()
        if self._proc is None or self._proc.poll() is not None:
            return  # the next save starts a writer process and sends it every segment
        with contextlib.suppress(WriterDied):  # (the next save finds it dead too, and says so)
            self._send_segments()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._stop()

    # ---------------------------------------------------------------------------------- the training process

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        env["CUDA_VISIBLE_DEVICES"] = ""  # it writes host memory; a CUDA context there would only cost device memory
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-c", _BOOT, str(theirs.fileno()), str(os.getpid())]
        try:
            self._proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self._sock = ours
        self._conn = Connection(os.dup(ours.fileno()))
        self._ready = False
        self._sent_segments = set()
        self._plans = {}
        self.starts += 1

    def _stop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send_bytes(pickle.dumps(("stop",)))  # a forked process may hold our end: say it
            self._conn.close()
            self._sock.close()
            self._conn = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=30)  # it ends when its socket closes
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def _write(self, job: SaveJob) -> Written:
        """Writer thread: the snapshot copies, then the job to the writer process and its answer."""
        started, cpu = time.perf_counter(), time.thread_time()
        if job.snapshot is not None:
            job.snapshot.take()
        if self._proc is None or self._proc.poll() is not None:
            self._stop()
            self._start()
        try:
            self._send_segments()
            message = self._message(job)
            self._send(("job", message))
            if job.kill_writer:  # +debug.kill_writer_at: as an OOM killer or a stray kill would
                os.kill(self._proc.pid, signal.SIGKILL)
            answer = self._receive()
        except WriterDied:
            self._stop()
            raise
        if answer[0] == "error":
            _, errno, text = answer
            raise OSError(errno, text) if errno else RuntimeError(f"the writer process failed: {text}")
        written: Written = answer[1]
        written.cpu_seconds += time.thread_time() - cpu
        written.seconds = time.perf_counter() - started
        return written

    def _send_segments(self) -> None:
        """Each shared segment the writer process has not mapped yet (its descriptor travels with the message),
        and the numbers of those it may unmap."""
        segments = self.stager.segments
        for number, segment in segments.items():
            if number not in self._sent_segments:
                self._send(("segment", number, segment.nbytes))
                socket.send_fds(self._sock, [b"s"], [segment.fd])
                self._sent_segments.add(number)
        gone = self._sent_segments - set(segments)
        if gone:
            self._send(("drop", sorted(gone)))
            self._sent_segments -= gone

    def _message(self, job: SaveJob) -> _Job:
        plan = job.plan
        known = self._plans.get(id(plan))
        if known is not None and known[0] is plan:
            plan_id, send_plan = known[1], None
        else:
            plan_id, send_plan = self._next_plan, plan
            self._next_plan += 1
            if len(self._plans) >= 8:
                self._plans.pop(next(iter(self._plans)))
            self._plans[id(plan)] = (plan, plan_id)
        tensors: list[_Tensor | torch.Tensor | None] = []
        objects: dict[str, Any] = {}
        deferred = False
        for item in plan.items:
            value = job.planner.lookup_object(item.index)
            if item.type == WriteItemType.BYTE_IO:
                tensors.append(None)
                objects[item.index.fqn] = value
                deferred |= hasattr(value, "resolve_for_save")
            else:
                tensors.append(self._tensor(value))
        local_state = _local_tensors(job.staged, self._tensor) if deferred else None
        fs = job.writer.fs
        assert isinstance(fs, ChecksummingFileSystem)
        return _Job(str(job.staging), plan_id, send_plan, tensors, objects, local_state, fs.direct, fs.full_disk)

    def _tensor(self, tensor: torch.Tensor) -> _Tensor | torch.Tensor:
        where = self.stager.locate(tensor)
        if where is None:  # not in a shared buffer (an empty tensor): its value travels in the message
            self.by_value += 1
            return tensor.detach().clone()
        shape, stride = tuple(tensor.shape), tuple(tensor.stride())
        return _Tensor(where, tensor.dtype, shape, stride, tensor.storage_offset())

    def _send(self, message: Any) -> None:
        assert self._conn is not None
        try:
            self._conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError as err:
            raise self._died() from err

    def _receive(self) -> Any:
        """The writer process's next answer; WriterDied as soon as it is gone (not only when its socket closes: a
        process forked meanwhile may hold a copy of its end)."""
        assert self._conn is not None and self._proc is not None
        while True:
            try:
                if self._conn.poll(_POLL_S):
                    answer = pickle.loads(self._conn.recv_bytes())
                    if answer[0] != "ready":  # (said once, when its imports are done)
                        return answer
                    continue
            except (EOFError, OSError) as err:
                raise self._died() from err
            if self._proc.poll() is not None:
                raise self._died()

    def _died(self) -> WriterDied:
        assert self._proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)
        code = self._proc.returncode
        how = (
            "is gone"
            if code is None
            else f"was killed by {signal.Signals(-code).name}"
            if code < 0
            else f"exited with status {code}"
        )
        return WriterDied(f"the checkpoint writer process (pid {self._proc.pid}) {how}")


def _local_tensors(obj: Any, locate: Any) -> Any:
    """The state's tensors as this rank's shards (DTensors as their local tensors), other values left out: what a
    deferred value reads (the fidelity digest reads `model`)."""
    if isinstance(obj, DTensor):
        return locate(obj.to_local())
    if isinstance(obj, torch.Tensor):
        return locate(obj)
    if isinstance(obj, dict):
        return {k: v for k, v in ((k, _local_tensors(v, locate)) for k, v in obj.items()) if v is not None}
    return None


# ------------------------------------------------------------------------------------------ the writer process


class _Mapped:
    """A shared segment as the writer process maps it."""

    def __init__(self, fd: int, nbytes: int) -> None:
        try:  # page tables filled at once (the pages are the training process's, already faulted in)
            self.map = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        finally:
            os.close(fd)


class _SharedPlanner:
    """What DCP's writer asks of a planner (`resolve_data`), answered from the shared buffers and the message; the
    same data as `io._Planner` gives the writer thread, so the files are byte for byte the same."""

    def __init__(self, plan: SavePlan, job: _Job, segments: dict[int, Any]) -> None:
        self.tensors = {}
        for item, where in zip(plan.items, job.tensors, strict=True):
            if where is not None:
                self.tensors[item.index] = where.view(segments) if isinstance(where, _Tensor) else where
        self.objects = job.objects
        self.local_state = _resolve_local(job.local_state, segments)

    def resolve_data(self, item: Any) -> Any:
        if item.type != WriteItemType.BYTE_IO:
            return self.tensors[item.index]
        value = self.objects[item.index.fqn]
        if hasattr(value, "resolve_for_save"):
            value = value.resolve_for_save(self.local_state)
        out = bytes_io.BytesIO()
        torch.save(value, out)
        return out


def _resolve_local(obj: Any, segments: dict[int, Any]) -> Any:
    if isinstance(obj, _Tensor):
        return obj.view(segments)
    if isinstance(obj, dict):
        return {k: _resolve_local(v, segments) for k, v in obj.items()}
    return obj


def _serve(conn: Connection, sock: socket.socket) -> None:
    segments: dict[int, _Mapped] = {}
    plans: dict[int, SavePlan] = {}
    buffer = WriteBuffer()
    conn.send_bytes(pickle.dumps(("ready",)))
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the training process closed its end, or is gone
        kind = message[0]
        if kind == "segment":
            _, number, nbytes = message
            _, fds, _, _ = socket.recv_fds(sock, 1, 1)
            segments[number] = _Mapped(fds[0], nbytes)
        elif kind == "drop":
            for number in message[1]:
                segments.pop(number, None)
        elif kind == "stop":
            return
        elif kind == "job":
            conn.send_bytes(pickle.dumps(_run(message[1], segments, plans, buffer), protocol=pickle.HIGHEST_PROTOCOL))


def _run(job: _Job, segments: dict[int, Any], plans: dict[int, SavePlan], buffer: WriteBuffer) -> tuple:
    started = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    try:
        if job.plan is not None:
            plans[job.plan_id] = job.plan
        plan = plans[job.plan_id]
        fs = ChecksummingFileSystem(buffer, job.direct, job.full_disk)
        writer = FileSystemWriter(
            job.staging, sync_files=True, single_file_per_rank=True, thread_count=1, per_thread_copy_ahead=0
        )
        writer.fs = fs
        planner = _SharedPlanner(plan, job, segments)
        results = writer.write_data(plan, planner).value()  # type: ignore[arg-type]
    except OSError as err:
        return ("error", err.errno, err.strerror if err.strerror else str(err))
    except Exception as err:
        return ("error", None, repr(err))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    spent = usage.ru_utime + usage.ru_stime - cpu
    return ("done", Written(results, dict(fs.entries), time.perf_counter() - started, spent, fs.wrote_direct, spent))


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the training process ends (Linux); stop at once if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        raise SystemExit(0)


def main() -> None:
    fd, parent = int(sys.argv[1]), int(sys.argv[2])
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the training process decides what a stop signal does (and `_BOOT`)
    _die_with_parent(parent)
    sock = socket.socket(fileno=fd)
    torch.set_num_threads(1)
    import curry_train.checkpoint.state  # noqa: F401 (what a deferred value unpickles to: imported before a save)

    # A save allocates enough to trigger the garbage collector's full collections, which scan every object torch's
    # import made (7% of this process's samples in a save); frozen, those are left out.
    gc.freeze()
    with without_zip_crc():
        _serve(Connection(os.dup(fd)), sock)
