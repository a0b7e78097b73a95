"""Carries out the policy: save through DCP, commit, link, move `latest`, apply retention, journal each event.

Every rank calls `save` (DCP is collective); only rank 0 touches the run directory and the journal. Decisions
(which roles, best-K admission) are pure functions of values every rank has, so ranks agree without talking.
"""

from __future__ import annotations

import enum
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from curry_train.checkpoint import io, node_local
from curry_train.checkpoint.commit import Committer
from curry_train.checkpoint.pending import Durable, ParamsCopy, PendingSave, StepClock
from curry_train.checkpoint.policy import BestK, Checkpoint, Contents, Role
from curry_train.checkpoint.staging import Snapshot, Stager, to_state_dict
from curry_train.checkpoint.state import PARAMS_ONLY_KEYS, DataLoaderState
from curry_train.checkpoint.store import RunDir
from curry_train.checkpoint.upload import RemoteCommit, Uploader
from curry_train.checkpoint.writer_process import ProcessWriter, WriterDied
from curry_train.config import CheckpointConfig, Faults
from curry_train.failures import PeerFailure
from curry_train.journal import Journal


class CommitState(enum.IntEnum):
    """How rank 0's commit of a save is going, as every rank hears it: the ranks all-reduce it with MAX, and the
    others say RUNNING, so the order of the values matters."""

    RUNNING = 0
    COMMITTED = 1
    FAILED = 2


class Checkpointer:
    def __init__(
        self,
        config: CheckpointConfig,
        *,
        store: RunDir,
        journal: Journal,
        group: dist.ProcessGroup,
        rank: int,
        faults: Faults | None = None,
        uploader: Uploader | None = None,
        node_local: bool = False,
    ) -> None:
        """The checkpointer of the `checkpoint` config block (its policy, save mode and file layer), for this rank."""
        faults = faults or Faults()
        self.store = store
        self.save_delay_s = faults.save_delay_s  # +debug.save_delay_s: each save blocks training this much longer
        self.uploader = uploader  # checkpoint.remote: committed saves are copied there in the background
        # No shared filesystem (node_local.py): each rank writes on its own node, and a save is committed only on
        # the remote, by the uploads; no node commits.
        self.node_local = node_local
        assert not node_local or uploader is not None, "node-local mode commits on checkpoint.remote"
        self.fail_save_at = faults.full_disk  # (step, rank): +debug.fail_save_at, a full disk while that save writes
        self.policy = config.policy()
        self.journal = journal
        self.group = group
        self.rank = rank
        self.is_main = rank == 0
        self.async_save = config.async_save
        self.kill_writer_at = faults.killed_writer  # (step, rank): +debug.kill_writer_at
        # One stager and one writer per run: the buffers are reused by every asynchronous save, one save is written
        # at a time. An asynchronous save's writer is a process of this rank (checkpoint.writer=process), fed
        # through shared staging buffers, or a thread of this process; a synchronous save's is this thread.
        in_process = config.async_save and config.writer == "process"
        self.stager = Stager(shared=in_process)
        self.writer = ProcessWriter(self.stager, config.direct_io) if in_process else io.Writer(config.direct_io)
        self.plans = io.PlanCache()  # DCP's save plans, reused while the state's structure stays the same
        self.writing: PendingSave | None = None  # every rank: bytes being written
        self.committing: PendingSave | None = None  # rank 0: durable bytes being committed
        self.durable: Durable | None = None
        # Every rank: the save whose commit rank 0 is carrying out, until every rank has heard how it went.
        self.commit_pending: Checkpoint | None = None
        self.commits = 0  # saves every rank has heard committed, at the same step on each (an auto cadence follows)
        self.settling: PendingSave | None = None  # every rank: that save, uploaded once its commit is heard
        self.my_files: list[str] = []  # every rank: the files it wrote of the last durable save
        self.my_copy_files: list[str] = []  # and of its best-K parameters copy, if it had one
        self.clock = StepClock()
        mode = "async" if config.async_save else "sync"
        writer = "process" if in_process else "thread"
        self.committer = Committer(store, journal, dist.get_world_size(group), mode, writer)  # rank 0's part
        self.best = BestK(self.policy, self._shared_listing(Role.BEST_K))

    def _shared_listing(self, role: Role) -> list[Checkpoint]:
        """Rank 0's view of the committed checkpoints of `role`, given to every rank."""
        listing = [self.store.list(role) if self.is_main else None]  # a one-item list: what broadcast fills in
        dist.broadcast_object_list(listing, src=0, group=self.group)
        return list(listing[0] or [])

    # ------------------------------------------------------------------------------------------------ saving

    def save(self, step: int, roles: list[Role], contents: Contents, state: dict[str, Stateful]) -> None:
        """Save one set of bytes for `roles` at `step` (the first role is written, the others linked).

        Asynchronous (the default): returns once the state is staged and the save planned; the bytes are written
        in the background and committed by a later `poll()` or `wait()`. Synchronous: the same save, waited for."""
        self.wait()
        # Recovery is written and the other role linked to it: recovery is kept longest, and `latest` names it.
        ordered = sorted(roles, key=lambda role: role is not Role.RECOVERY)
        checkpoints = [Checkpoint(role, step) for role in ordered]
        self._start(PendingSave(checkpoints, contents, time.perf_counter(), extra=_data_position(state)), state)
        if not self.async_save:
            self.wait()

    def prepare(self, state: dict[str, Stateful]) -> None:
        """Ahead of the first save (once the state has its final structure: after the first step made the optimizer
        state), plan a save of `state`, and for asynchronous saves allocate its staging buffers and fault them in while
        training goes on, so that the first save costs training what every later one does. On every rank."""
        state_dict = to_state_dict(state)
        if self.async_save:
            self.stager.reserve(state_dict)
            state_dict = self.stager.layout(state_dict)
            self.writer.prepare()
        io.plan_ahead(state_dict, self.group, self.plans)

    def consider_best_k(self, step: int, value: float, state_factory: Callable[[], dict[str, Stateful]]) -> bool:
        """Save a parameters-only best-K checkpoint when `value` ranks in the top best_k.

        At a step that already has a save in flight or durable (the cadence roles often fall on evaluation steps):
        a parameters-only save becomes hard links; a full save lends the state it wrote (its staged copy, or the
        live state of a synchronous save, still the step's): no second staging. A full save in flight writes the
        best-K after itself (`ParamsCopy`: no wait)."""
        admission = self.best.admit(step, value)
        if admission is None:
            return False
        checkpoint = admission.checkpoint
        if self.is_main:
            self.journal.append(
                "best_k",
                step,
                metric=self.policy.best_k_metric,
                value=checkpoint.metric,
                reason=admission.reason,
                evict=[c.relpath for c in admission.evict],
            )
        writing = self.writing
        if writing is not None and writing.step == step:
            if writing.contents is Contents.PARAMS:
                writing.checkpoints.append(checkpoint)  # linked when the save commits
            else:
                self._start_params_copy(writing, checkpoint)
            return True
        durable = self.durable
        if durable is not None and durable.step == step and durable.contents is Contents.PARAMS:
            self._link_committed(durable.checkpoint, checkpoint)
            return True
        self.wait()
        if durable is not None and durable.step == step:
            self._submit(
                PendingSave([checkpoint], Contents.PARAMS, time.perf_counter(), extra=durable.extra), durable.params
            )
        else:
            state = state_factory()
            self._start(
                PendingSave([checkpoint], Contents.PARAMS, time.perf_counter(), extra=_data_position(state)), state
            )
        if not self.async_save:
            self.wait()
        return True

    def _start(self, pending: PendingSave, state: dict[str, Stateful]) -> None:
        """Stage (asynchronous saves) and plan the save on every rank, then hand it to the writer thread."""
        try:
            state_dict = to_state_dict(state)
            snapshot = None
            if self.async_save:
                # Parameters and optimizer state change only at optimizer.step(): the copies are made while the next
                # forward and backward run, and `before_update` waits for them.
                state_dict, snapshot = self.stager.stage(state_dict)
        except Exception as err:
            self._journal_error(pending.checkpoints[0], f"save failed: {err!r}; earlier checkpoints are intact")
            raise
        self._submit(pending, state_dict, snapshot)

    def _submit(self, pending: PendingSave, state_dict: dict[str, Any], snapshot: Snapshot | None = None) -> None:
        """Plan the save of `state_dict` (staged, or the live state of a synchronous save) on every rank, then hand
        it to the writer thread."""
        first = pending.checkpoints[0]
        pending.stage_seconds = time.perf_counter() - pending.started
        try:
            pending.job = self._plan(first, state_dict)
            pending.job.snapshot = snapshot
            if self.save_delay_s:  # a slow save on demand, in its blocking part (tests of the automatic cadence)
                time.sleep(self.save_delay_s)
        except Exception as err:  # e.g. a full disk: every committed checkpoint is still there; say so
            self._journal_error(first, f"save failed: {err!r}; earlier checkpoints are intact")
            raise
        self.writer.submit(pending.job)
        pending.mark = time.perf_counter()
        pending.blocking_seconds = pending.mark - pending.started
        self.writing = pending
        self.clock.dirty = True

    def _plan(self, checkpoint: Checkpoint, state_dict: dict[str, Any]) -> io.SaveJob:
        """Plan the save of `state_dict` as `checkpoint` on every rank, into a fresh staging directory."""
        full_disk = self.fail_save_at == (checkpoint.step, self.rank)
        if self.node_local:  # each rank its own directory, on its own node
            staging = node_local.staging_of(self.store.path, self.rank, checkpoint)
        else:
            # Rank 0 prepares the staging directory (removing any leftover of a crashed save of the same name) before
            # the planning collective lets the other ranks write into it.
            shared = [str(self.store.staging_dir(checkpoint)) if self.is_main else None]
            dist.broadcast_object_list(shared, src=0, group=self.group)
            staging = Path(shared[0])
        job = io.SaveJob.start(state_dict, staging, self.group, self.writer.filesystem(full_disk), self.plans)
        job.kill_writer = self.kill_writer_at == (checkpoint.step, self.rank)
        return job

    def _start_params_copy(self, pending: PendingSave, checkpoint: Checkpoint) -> None:
        """`checkpoint` as the parameters-only part of the full save in flight, written by the writer after that save.

        The writer writes one job at a time, in order: the full save's job completes the snapshot into the staging
        buffers before it serialises, so the copy reads finished buffers; and the next save stages into them only
        after `wait()`, which waits for both jobs. (A synchronous save writes the live tensors, unchanged until the
        next update, and `wait()` comes before that too.)"""
        assert pending.job is not None
        try:
            job = self._plan(checkpoint, _params_only(pending.job.staged))
        except Exception as err:
            self._journal_error(checkpoint, f"save failed: {err!r}; earlier checkpoints are intact")
            raise
        self.writer.submit(job)
        pending.params_copy = ParamsCopy(checkpoint, job)

    def before_update(self) -> None:
        """Before `optimizer.step()` (or anything else that changes parameters or optimizer state): the save in
        flight has its copy of them. Costs nothing when no save is in flight or its copy is done."""
        pending = self.writing
        if pending is None or pending.job is None or pending.job.snapshot is None:
            return
        started = time.perf_counter()
        pending.job.snapshot.wait()
        pending.snapshot_wait_seconds += time.perf_counter() - started

    def poll(self) -> None:
        """Once a step on every rank: commit a save whose bytes every rank has made durable.

        While a save is in flight this costs one tiny all-reduce on the checkpoint group, so that all ranks agree
        on the step at which they gather their reports (a collective every rank reaches, on the training thread)."""
        now = time.perf_counter()
        pending = self.writing
        self.clock.tick(now, busy=pending is not None or self.commit_pending is not None)
        if pending is None and self.commit_pending is None:
            return
        if pending is not None:
            pending.overlapped.append(now - pending.mark)
            pending.mark = now
        # One tiny all-reduce: is any rank's write still going, and how is rank 0's commit doing.
        still_writing = pending is not None and not all(_future(job).done() for _, job in pending.parts())
        flags = torch.tensor([int(still_writing), self._commit_state()], dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        self._settle_commit(CommitState(int(flags[1])))
        if pending is not None and not flags[0] and self._collect(pending):
            self._begin_commit(pending, inline=False)

    def wait(self) -> None:
        """Block until the save in flight (if any) is written and committed, on every rank."""
        started = time.perf_counter()
        pending = self.writing
        if pending is not None:
            pending.waiting_since = started
            futures_wait([_future(job) for _, job in pending.parts()])
            if self._collect(pending):
                self._begin_commit(pending, inline=True)
        if self.commit_pending is not None:
            if self.is_main and self.committing is not None and self.committing.commit_thread is not None:
                self.committing.commit_thread.join()
            flags = torch.tensor([self._commit_state()], dtype=torch.int32)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
            self._settle_commit(CommitState(int(flags[0])))

    def _commit_state(self) -> CommitState:
        """Rank 0's commit of the pending save: running, committed or failed (other ranks say running)."""
        committing = self.committing
        thread = committing.commit_thread if committing is not None else None
        if not self.is_main or committing is None or thread is None or thread.is_alive():
            return CommitState.RUNNING
        return CommitState.FAILED if committing.commit_error is not None else CommitState.COMMITTED

    def _settle_commit(self, state: CommitState) -> None:
        """What every rank does once it has heard how rank 0's commit went: go on, or stop (all of them)."""
        if state is CommitState.RUNNING or self.commit_pending is None:
            return
        failed, self.commit_pending = self.commit_pending, None
        committing, self.committing = self.committing, None
        settled, self.settling = self.settling, None
        if state is CommitState.COMMITTED and settled is not None:
            self._upload(settled.checkpoints, self.my_files)
            if settled.params_copy is not None:
                self._upload([settled.params_copy.checkpoint], self.my_copy_files)
        if state is CommitState.FAILED:
            if self.is_main and committing is not None and committing.commit_error is not None:
                raise committing.commit_error
            raise PeerFailure(f"rank 0 could not commit {failed.relpath} (its message says why)")
        self.commits += 1

    def _collect(self, pending: PendingSave) -> bool:
        """Every rank's report of its durable files, on every rank: a failed write anywhere fails the save
        everywhere, and rank 0 gets the checksums each rank computed of its own files. False: the save is lost
        because a writer process died (`_drop`); training goes on."""
        self.writing = None
        parts = pending.parts()
        errors = [_future(job).exception() for _, job in parts]
        mine = [
            f"rank {self.rank}: {err!r}" if err is not None else _future(job).result()
            for (_, job), err in zip(parts, errors, strict=True)
        ]
        reports: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(reports, mine, group=self.group)
        failures = [r for report in reports for r in report if isinstance(r, str)]
        if failures and all(f"{WriterDied.__name__}(" in f for f in failures):
            self._drop(parts, failures, [e for e in errors if e is not None])
            return False
        for i, (checkpoint, _) in enumerate(parts):
            failed = [r[i] for r in reports if isinstance(r[i], str)]
            if not failed:
                continue
            self._journal_error(checkpoint, f"save failed: {'; '.join(failed)}; earlier checkpoints are intact")
            err = errors[i]
            if err is not None:  # this rank's own failure: it tells the user
                raise OSError(
                    getattr(err, "errno", None),
                    f"could not write {checkpoint.relpath} ({err}); the checkpoints committed before it and "
                    "`latest` are intact",
                ) from err
            raise PeerFailure(f"{failed[0].split(':')[0]} could not write {checkpoint.relpath}")
        pending.written = [r[0] for r in reports]
        if pending.params_copy is not None:
            pending.params_copy.written = [r[1] for r in reports]
        # Rank 0 also writes DCP's `.metadata` of each checkpoint, at the commit.
        metadata = [".metadata"] if self.is_main else []
        mine = reports[dist.get_rank(self.group)]
        self.my_files = sorted(mine[0].files) + metadata
        self.my_copy_files = sorted(mine[1].files) + metadata if pending.params_copy is not None else []
        assert pending.job is not None
        self.durable = Durable(
            pending.step, pending.checkpoints[0], pending.contents, _params_only(pending.job.staged), pending.extra
        )
        pending.baseline = self.clock.baseline()
        return True

    def _drop(self, parts: list[tuple[Checkpoint, io.SaveJob]], failures: list[str], mine: list[BaseException]) -> None:
        """A writer process died while it wrote this save: the save is lost (journaled, its staging directory
        removed), the committed checkpoints are intact, and training goes on; the next save starts a new writer."""
        for checkpoint, job in parts:
            self._journal_error(
                checkpoint,
                f"save failed: {'; '.join(sorted(set(failures)))}; the next save starts a new writer process; "
                "earlier checkpoints are intact",
            )
            if self.is_main:
                shutil.rmtree(job.staging, ignore_errors=True)
        if mine:
            print(
                f"curry-train: rank {self.rank}: {mine[0]}: {parts[0][0].relpath} is not saved (the checkpoints "
                "committed before it are intact); training goes on and the next save starts a new writer process",
                file=sys.stderr,
                flush=True,
            )

    def _begin_commit(self, pending: PendingSave, inline: bool) -> None:
        """Rank 0 commits: inline when the caller waits anyway, else in a thread (fsyncs of directories, the
        manifest, links and retention touch only the filesystem and the journal, no collective). Every rank then
        hears how it went, at the next `poll()` or `wait()`, and a failure stops them all."""
        if self.node_local:
            self._commit_on_remote(pending)
            return
        self.commit_pending = pending.checkpoints[0]
        self.settling = pending
        if not self.is_main:
            return

        def commit() -> None:
            try:
                self.committer.commit(pending, self.policy)
            except Exception as err:
                pending.commit_error = err
                self._journal_error(pending.checkpoints[0], f"commit failed: {err!r}; earlier checkpoints are intact")

        self.committing = pending
        pending.commit_thread = threading.Thread(target=commit, name="curry-train-commit")
        pending.commit_thread.start()
        if inline:
            pending.commit_thread.join()

    def _link_committed(self, source: Checkpoint, checkpoint: Checkpoint) -> None:
        """`checkpoint` as hard links of the durable save `source` (rank 0, once its commit is done); every rank learns
        of a failure."""
        outcome: Exception | None = None
        self.wait()  # the source's commit, heard by every rank
        if self.is_main:
            try:
                self.committer.link(source, checkpoint, self.policy)
            except Exception as err:
                outcome = err
        failure = [outcome]
        dist.broadcast_object_list(failure, src=0, group=self.group)
        if failure[0] is not None:
            raise failure[0]
        self._upload([checkpoint], self.my_files)

    # ------------------------------------------------------------------------------------------------ remote

    def _commit_on_remote(self, pending: PendingSave) -> None:
        """Node-local mode, every rank once all have reported their files durable: hand them to the uploader, rank 0
        with what makes `.metadata` and the manifest; the manifest's upload commits the save (journaled then)."""
        assert self.uploader is not None and pending.job is not None
        assert pending.params_copy is None, "node-local mode has no best-K (node_local.refusal)"
        commit = None
        if self.is_main:
            commit = RemoteCommit(pending.job, pending.written, pending.contents, pending.extra, pending.started)
        self.uploader.submit_written(pending.checkpoints, pending.job.staging, self.my_files, commit)
        self.commits += 1

    def _upload(self, checkpoints: list[Checkpoint], names: list[str]) -> None:
        """Every rank, once all have heard that `checkpoints` committed: this rank's files of them to the uploader."""
        if self.uploader is not None:
            self.uploader.submit_committed(checkpoints, names, self.store, self.group)

    def latest(self) -> Checkpoint | None:
        """Rank 0: the newest committed checkpoint with full state (node-local mode: on the remote, where they are
        committed)."""
        if self.node_local and self.uploader is not None:
            return self.uploader.remote.latest()
        return self.store.latest()

    def finish_uploads(self) -> None:
        """At the run's end (every rank): the last save committed, then the uploads finished (`Uploader.finish`)."""
        if self.uploader is not None:
            self.wait()
            self.uploader.finish(self.store, self.group)

    def _journal_error(self, checkpoint: Checkpoint, reason: str) -> None:
        if self.is_main:
            self.committer.journal_error(checkpoint, reason)

    def close(self) -> None:
        """Finish the save in flight (every rank) and end the writer's thread: the launch is done saving."""
        self.wait()
        self.writer.close()
        self.committer.close()
        if self.node_local and self.uploader is not None:  # nothing else holds its saves: wait for their uploads
            self.uploader.join()


def _params_only(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The entries of a state dict that a parameters-only checkpoint holds (the same objects, not copies)."""
    return {key: state_dict[key] for key in PARAMS_ONLY_KEYS if key in state_dict}


def _future(job: io.SaveJob) -> Future[io.Written]:
    assert job.future is not None, "a job is submitted to the writer as soon as it is planned"
    return job.future


def _data_position(state: dict[str, Stateful]) -> dict[str, Any]:
    """Where the data stood at the saved step (the `dataloader` entry), repeated in the manifest: tools and a manual
    rollback read it without DCP."""
    data = state.get("dataloader")
    if not isinstance(data, DataLoaderState):
        return {}
    return {"cursor": data.progress.cursor, "skipped": [list(r) for r in data.progress.skipped]}
