"""Carries out the policy: save through DCP, commit, link, move `latest`, apply retention, journal each event.

Every rank calls `save` (DCP is collective); only rank 0 touches the run directory and the journal. Decisions
(which roles, best-K admission) are pure functions of values every rank has, so ranks agree without talking.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from curry_train.checkpoint import io
from curry_train.checkpoint.policy import Checkpoint, Policy, Role, best_k_decision, retention
from curry_train.checkpoint.state import Contents, ProgressState
from curry_train.checkpoint.store import RunDir
from curry_train.checkpoint.upload import Uploader
from curry_train.failures import PeerFailure
from curry_train.journal import Journal


@dataclass
class PendingSave:
    """A save from its start to its commit: one set of bytes, written for the first checkpoint, linked for the rest."""

    checkpoints: list[Checkpoint]  # the first is written; the others become hard links of it
    contents: Contents
    started: float
    extra: dict[str, Any] = field(default_factory=dict)  # for the manifest: where the data stood at this step
    job: io.SaveJob | None = None
    stage_seconds: float = 0.0
    blocking_seconds: float = 0.0  # the training thread's time inside save() and wait() for this save
    snapshot_wait_seconds: float = 0.0  # the training thread's wait, before the next update, for the staged copy
    overlapped: list[float] = field(default_factory=list)  # the step intervals it was in flight during
    mark: float = 0.0  # when the current overlapped interval began
    waiting_since: float | None = None  # when wait() began blocking on it (a synchronous save: right after start)
    baseline: float | None = None  # the step time without a save, when its bytes were durable
    written: list[io.Written] = field(default_factory=list)  # every rank's report, once all are durable
    committer: threading.Thread | None = None  # rank 0's commit while training goes on
    commit_error: Exception | None = None

    @property
    def step(self) -> int:
        return self.checkpoints[0].step


class StepClock:
    """Wall time between `poll()` calls (one a step, on the loop's path), to tell what a save cost training.

    A save in flight slows the steps it overlaps (its writer shares the cores, the memory bandwidth and the GIL);
    that extra time, not the time the training thread spent inside `save()`, is what it cost. The baseline is the
    median of recent intervals with no save started, waited for or in flight, so an occasional evaluation step
    does not move it.
    """

    def __init__(self, window: int = 25) -> None:
        self.clean: deque[float] = deque(maxlen=window)
        self.last: float | None = None
        self.dirty = False  # the current interval had a save in it

    def tick(self, now: float, busy: bool) -> None:
        if self.last is not None and not self.dirty:
            self.clean.append(now - self.last)
        self.last, self.dirty = now, busy

    def baseline(self) -> float | None:
        return statistics.median(self.clean) if self.clean else None


class Checkpointer:
    def __init__(
        self,
        store: RunDir,
        policy: Policy,
        journal: Journal,
        group: dist.ProcessGroup,
        rank: int,
        async_save: bool = True,
        fail_save_at: tuple[int, int] | None = None,
        direct_io: bool = True,
        uploader: Uploader | None = None,
    ) -> None:
        self.store = store
        self.uploader = uploader  # checkpoint.remote: committed saves are copied there in the background
        self.fail_save_at = fail_save_at  # (step, rank): +debug.fail_save_at, a full disk while that save writes
        self.policy = policy
        self.journal = journal
        self.group = group
        self.rank = rank
        self.is_main = rank == 0
        self.async_save = async_save
        self.stager = io.Stager()  # one per run: its buffers are reused by every asynchronous save
        self.writer = io.Writer(direct_io)  # one per run: one save written at a time
        self.writing: PendingSave | None = None  # every rank: bytes being written
        self.committing: PendingSave | None = None  # rank 0: durable bytes being committed
        self.durable: tuple[int, Checkpoint] | None = None  # the last save whose bytes every rank made durable
        # Every rank: the save whose commit rank 0 is carrying out, until every rank has heard how it went.
        self.commit_pending: Checkpoint | None = None
        self.settling: PendingSave | None = None  # every rank: that save, uploaded once its commit is heard
        self.my_files: list[str] = []  # every rank: the files it wrote of the last durable save
        self.clock = StepClock()
        self.best: list[Checkpoint] = self._shared_listing(Role.BEST_K)

    def _shared_listing(self, role: Role) -> list[Checkpoint]:
        """Rank 0's view of the committed checkpoints of `role`, given to every rank."""
        box = [self.store.list(role) if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return list(box[0] or [])

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

    def consider_best_k(self, step: int, value: float, state_factory: Callable[[], dict[str, Stateful]]) -> bool:
        """Save a parameters-only best-K checkpoint when `value` ranks in the top best_k.

        At a step that already has a save in flight or durable (the cadence roles often fall on evaluation steps),
        the best-K checkpoint becomes hard links of that save, which holds the parameters too: no wait, no write."""
        if self.policy.best_k == 0:
            return False
        # Six significant digits keep the name readable (dev-loss-2.34102-step-...) at any scale of the metric;
        # values equal to that precision tie, and a tie keeps the earlier checkpoint.
        value = float(f"{value:.6g}")
        if any(c.step == step and c.metric == value for c in self.best):
            # A resumed run evaluating the same step again. (The same step with another value is a new trajectory
            # after a rollback: it competes like any other.)
            return False
        decision = best_k_decision(self.policy, self.best, step, value)
        if not decision.admit:
            return False
        ckpt = Checkpoint(Role.BEST_K, step, metric=value, metric_name=self.policy.best_k_metric)
        self.best = [c for c in self.best if c not in decision.evict] + [ckpt]
        if self.is_main:
            self.journal.append(
                "best_k",
                step,
                metric=self.policy.best_k_metric,
                value=value,
                reason=decision.reason,
                evict=[c.relpath for c in decision.evict],
            )
        if self.writing is not None and self.writing.step == step:
            self.writing.checkpoints.append(ckpt)  # linked when the save commits
            return True
        if self.durable is not None and self.durable[0] == step:
            self._link_committed(self.durable[1], ckpt)
            return True
        self.wait()
        state = state_factory()
        self._start(PendingSave([ckpt], Contents.PARAMS, time.perf_counter(), extra=_data_position(state)), state)
        if not self.async_save:
            self.wait()
        return True

    def _start(self, pending: PendingSave, state: dict[str, Stateful]) -> None:
        """Stage (asynchronous saves) and plan the save on every rank, then hand it to the writer thread."""
        first = pending.checkpoints[0]
        try:
            # Rank 0 prepares the staging directory (removing any leftover of a crashed save of the same name)
            # before the planning collective lets the other ranks write into it.
            box = [str(self.store.staging_dir(first)) if self.is_main else None]
            dist.broadcast_object_list(box, src=0, group=self.group)
            state_dict = io.to_state_dict(state)
            snapshot = None
            if self.async_save:
                # Parameters and optimizer state change only at optimizer.step(): the copies are made while the next
                # forward and backward run, and `before_update` waits for them.
                state_dict, snapshot = self.stager.stage(state_dict)
            pending.stage_seconds = time.perf_counter() - pending.started
            full_disk = self.fail_save_at == (first.step, self.rank)
            pending.job = io.SaveJob.start(state_dict, Path(box[0]), self.group, self.writer.filesystem(full_disk))
            pending.job.snapshot = snapshot
        except Exception as err:  # e.g. a full disk: every committed checkpoint is still there; say so
            self._journal_error(first, f"save failed: {err!r}; earlier checkpoints are intact")
            raise
        self.writer.submit(pending.job)
        pending.mark = time.perf_counter()
        pending.blocking_seconds = pending.mark - pending.started
        self.writing = pending
        self.clock.dirty = True

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
            assert pending.job is not None and pending.job.future is not None
        # One tiny all-reduce: is any rank's write still going, and how is rank 0's commit doing.
        still_writing = pending is not None and not pending.job.future.done()
        flags = torch.tensor([int(still_writing), self._commit_state()], dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        self._settle_commit(int(flags[1]))
        if pending is not None and not flags[0]:
            self._collect(pending)
            self._begin_commit(pending, inline=False)

    def wait(self) -> None:
        """Block until the save in flight (if any) is written and committed, on every rank."""
        started = time.perf_counter()
        pending = self.writing
        if pending is not None:
            assert pending.job is not None and pending.job.future is not None
            pending.waiting_since = started
            futures_wait([pending.job.future])
            self._collect(pending)
            self._begin_commit(pending, inline=True)
        if self.commit_pending is not None:
            if self.is_main and self.committing is not None and self.committing.committer is not None:
                self.committing.committer.join()
            flags = torch.tensor([self._commit_state()], dtype=torch.int32)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
            self._settle_commit(int(flags[0]))

    _RUNNING, _COMMITTED, _FAILED = 0, 1, 2

    def _commit_state(self) -> int:
        """Rank 0's commit of the pending save: running, committed or failed (other ranks say running)."""
        committing = self.committing
        if not self.is_main or committing is None or committing.committer is None or committing.committer.is_alive():
            return self._RUNNING
        return self._FAILED if committing.commit_error is not None else self._COMMITTED

    def _settle_commit(self, state: int) -> None:
        """What every rank does once it has heard how rank 0's commit went: go on, or stop (all of them)."""
        if state == self._RUNNING or self.commit_pending is None:
            return
        failed, self.commit_pending = self.commit_pending, None
        committing, self.committing = self.committing, None
        settled, self.settling = self.settling, None
        if state == self._COMMITTED and settled is not None:
            self._upload(settled.checkpoints, self.my_files)
        if state == self._FAILED:
            if self.is_main and committing is not None and committing.commit_error is not None:
                raise committing.commit_error
            raise PeerFailure(f"rank 0 could not commit {failed.relpath} (its message says why)")

    def _collect(self, pending: PendingSave) -> None:
        """Every rank's report of its durable files, on every rank: a failed write anywhere fails the save
        everywhere, and rank 0 gets the checksums each rank computed of its own files."""
        self.writing = None
        assert pending.job is not None and pending.job.future is not None
        err = pending.job.future.exception()
        mine: io.Written | str = f"rank {self.rank}: {err!r}" if err is not None else pending.job.future.result()
        reports: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(reports, mine, group=self.group)
        failed = [r for r in reports if isinstance(r, str)]
        if failed:
            relpath = pending.checkpoints[0].relpath
            self._journal_error(
                pending.checkpoints[0], f"save failed: {'; '.join(failed)}; earlier checkpoints are intact"
            )
            if err is not None:  # this rank's own failure: it tells the user
                raise OSError(
                    getattr(err, "errno", None),
                    f"could not write {relpath} ({err}); the checkpoints committed before it and `latest` are intact",
                ) from err
            raise PeerFailure(f"{failed[0].split(':')[0]} could not write {relpath}")
        pending.written = reports
        # Rank 0 also writes DCP's `.metadata`, at the commit.
        self.my_files = sorted(reports[dist.get_rank(self.group)].files) + ([".metadata"] if self.is_main else [])
        self.durable = (pending.step, pending.checkpoints[0])
        pending.baseline = self.clock.baseline()

    def _begin_commit(self, pending: PendingSave, inline: bool) -> None:
        """Rank 0 commits: inline when the caller waits anyway, else in a thread (fsyncs of directories, the
        manifest, links and retention touch only the filesystem and the journal, no collective). Every rank then
        hears how it went, at the next `poll()` or `wait()`, and a failure stops them all."""
        self.commit_pending = pending.checkpoints[0]
        self.settling = pending
        if not self.is_main:
            return

        def commit() -> None:
            try:
                self._commit(pending)
            except Exception as err:
                pending.commit_error = err
                self._journal_error(pending.checkpoints[0], f"commit failed: {err!r}; earlier checkpoints are intact")

        self.committing = pending
        pending.committer = threading.Thread(target=commit, name="curry-train-commit")
        pending.committer.start()
        if inline:
            pending.committer.join()

    def _commit(self, pending: PendingSave) -> None:
        first = pending.checkpoints[0]
        assert pending.job is not None
        pending.job.finish_metadata([w.results for w in pending.written])
        known = {name: entry for w in pending.written for name, entry in w.files.items()}
        _check_reported(pending.job.staging, known)
        # What a resume needs to know before loading: how much the checkpoint holds, and how many ranks wrote it.
        extra = {"contents": pending.contents.value, "world_size": dist.get_world_size(self.group), **pending.extra}
        # Every data file was fsynced by its rank's writer before that rank reported it, and `.metadata` by
        # FileSystemWriter.finish (sync_files=True): the commit fsyncs only directories and the manifest.
        durable = frozenset(known) | {".metadata"}
        manifest = self.store.commit(first, pending.job.staging, extra=extra, known=known, durable=durable)
        blocking, cost = self._costs(pending)
        self._journal_save(
            first,
            manifest.total_bytes,
            pending.contents,
            seconds=round(time.perf_counter() - pending.started, 4),
            blocking_seconds=round(blocking, 4),
            cost_seconds=None if cost is None else round(cost, 4),
            stage_seconds=round(pending.stage_seconds, 4),
            snapshot_wait_seconds=round(pending.snapshot_wait_seconds, 4),
            write_seconds=round(max(w.seconds for w in pending.written), 4),
            write_cpu_seconds=round(max(w.cpu_seconds for w in pending.written), 4),
            direct_io=all(w.direct for w in pending.written),
            mode="async" if self.async_save else "sync",
        )
        for ckpt in pending.checkpoints[1:]:
            linked = self.store.link(first, ckpt)
            self._journal_save(ckpt, linked.total_bytes, pending.contents, seconds=0.0, linked_from=first.relpath)
        if pending.contents is Contents.FULL:
            self.store.set_latest(first)
        self._apply_retention(first.step)

    @staticmethod
    def _costs(pending: PendingSave) -> tuple[float, float | None]:
        """The training thread's blocked time, and what the save cost training: that blocked time plus the extra
        time, over the baseline step, of the steps it overlapped (each measured from the end of the start, or of
        the previous step, to the end of the step, so the blocked time is not counted twice). None without a
        baseline yet."""
        waited = 0.0 if pending.waiting_since is None else time.perf_counter() - pending.waiting_since
        blocking = pending.blocking_seconds + waited
        if not pending.overlapped:  # started and finished within one step: all of it blocked training
            return blocking, blocking
        if pending.baseline is None:
            return blocking, None
        return blocking, blocking + max(0.0, sum(t - pending.baseline for t in pending.overlapped))

    def _link_committed(self, source: Checkpoint, ckpt: Checkpoint) -> None:
        """`ckpt` as hard links of the durable save `source` (rank 0, once its commit is done); every rank learns
        of a failure."""
        outcome: Exception | None = None
        self.wait()  # the source's commit, heard by every rank
        if self.is_main:
            try:
                linked = self.store.link(source, ckpt)
                self._journal_save(
                    ckpt,
                    linked.total_bytes,
                    Contents(linked.extra["contents"]),
                    seconds=0.0,
                    linked_from=source.relpath,
                )
                self._apply_retention(ckpt.step)
            except Exception as err:
                outcome = err
        box = [outcome]
        dist.broadcast_object_list(box, src=0, group=self.group)
        if box[0] is not None:
            raise box[0]
        self._upload([ckpt], self.my_files)

    # ------------------------------------------------------------------------------------------------ remote

    def _upload(self, checkpoints: list[Checkpoint], names: list[str]) -> None:
        """Every rank, once all have heard that `checkpoints` committed: hand this rank's files of them to the
        uploader. Whether their role's upload is still in flight anywhere is agreed here (one tiny all-reduce a
        commit), so every rank uploads the same saves and rank 0's manifest never waits for files that never come."""
        if self.uploader is None or not self.uploader.wanted(checkpoints):
            return
        busy = torch.tensor(self.uploader.busy(), dtype=torch.int32)
        dist.all_reduce(busy, op=dist.ReduceOp.MAX, group=self.group)
        wanted = [c for c in self.uploader.wanted(checkpoints) if self.store.is_committed(c)]
        if not wanted:
            return
        manifests = [self.store.manifest(c) for c in wanted] if self.is_main else []
        self.uploader.submit(wanted, self.store.path_of(wanted[0]), names, manifests, busy.tolist())

    def finish_uploads(self) -> None:
        """At the run's end (every rank): wait for the uploads in flight, then upload the newest commit of each role
        that a busy lane skipped, so that a finished run's newest checkpoints are remote."""
        if self.uploader is None:
            return
        self.wait()
        self.uploader.join()
        for checkpoints, names in list(self.uploader.skipped.values()):
            self._upload(checkpoints, names)
        self.uploader.join()

    def _journal_error(self, ckpt: Checkpoint, reason: str) -> None:
        if self.is_main:
            self.journal.append("error", ckpt.step, role=ckpt.role, path=ckpt.relpath, reason=reason)

    def _journal_save(self, ckpt: Checkpoint, nbytes: int, contents: Contents, **fields: Any) -> None:
        self.journal.append(
            "save", ckpt.step, role=ckpt.role, path=ckpt.relpath, bytes=nbytes, contents=contents, **fields
        )

    def _apply_retention(self, step: int) -> None:
        latest = self.store.latest()
        protected = {latest.relpath} if latest else set()
        for deletion in retention(self.policy, self.store.list(), protected):
            freed = self.store.delete(deletion.checkpoint)
            self.journal.append(
                "delete",
                deletion.checkpoint.step,
                role=deletion.checkpoint.role,
                path=deletion.checkpoint.relpath,
                bytes=freed,
                reason=deletion.reason,
            )
        abandoned = self.store.abandoned()
        for item in abandoned[: max(0, len(abandoned) - self.policy.abandoned_keep)]:
            self.journal.append(
                "delete",
                step,
                role=item.role,
                path=item.relpath,
                bytes=self.store.remove_abandoned(item),
                reason=f"abandoned_keep={self.policy.abandoned_keep} exceeded (set aside by a rollback)",
            )

    # ------------------------------------------------------------------------------------------------ loading

    def load(self, path: Path, state: dict[str, Stateful]) -> None:
        """Load the keys of `state` that the checkpoint at `path` holds (all ranks)."""
        io.load(state, path, self.group)


def _data_position(state: dict[str, Stateful]) -> dict[str, Any]:
    """Where the data stood at the saved step, for the manifest: tools and a manual rollback read it without DCP."""
    progress = state.get("progress")
    if not isinstance(progress, ProgressState):
        return {}
    return {"cursor": progress.progress.cursor, "skipped": [list(r) for r in progress.progress.skipped]}


def _check_reported(staging: Path, reported: dict[str, Any]) -> None:
    """Rank 0 commits what the ranks report they wrote, checked against what it sees and what DCP's `.metadata`
    references: on nodes that do not share `run.root`, rank 0 would otherwise commit a checkpoint without the other
    nodes' shards, and retention would then delete the good ones."""
    from torch.distributed.checkpoint import FileSystemReader

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
