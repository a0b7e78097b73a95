"""Carries out the policy: save through DCP, commit, link, move `latest`, apply retention, journal each event.

Every rank calls `save` (DCP is collective); only rank 0 touches the run directory and the journal. Decisions
(which roles, best-K admission) are pure functions of values every rank has, so ranks agree without talking.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from curry_train.checkpoint import io
from curry_train.checkpoint.policy import Checkpoint, Policy, Role, best_k_decision, retention
from curry_train.checkpoint.state import Contents, ProgressState
from curry_train.checkpoint.store import FileEntry, RunDir, file_entry
from curry_train.journal import Journal


@dataclass
class PendingSave:
    """A save whose bytes are being written (asynchronously) and that is not committed yet."""

    checkpoints: list[Checkpoint]  # the first is written; the others become hard links of it
    contents: Contents
    started: float
    staging: Path | None = None
    future: Future | None = None
    blocking_seconds: float = 0.0
    known: dict[str, FileEntry] = field(default_factory=dict)  # checksums the writing ranks computed
    committer: threading.Thread | None = None  # rank 0's commit of an asynchronous save
    commit_error: Exception | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # for the manifest: where the data stood at this step


class Checkpointer:
    def __init__(
        self,
        store: RunDir,
        policy: Policy,
        journal: Journal,
        group: dist.ProcessGroup,
        rank: int,
        async_save: bool = False,
    ) -> None:
        self.store = store
        self.policy = policy
        self.journal = journal
        self.group = group
        self.rank = rank
        self.is_main = rank == 0
        self.async_save = async_save
        self.pending: PendingSave | None = None
        self.best: list[Checkpoint] = self._shared_listing(Role.BEST_K)

    def _shared_listing(self, role: Role) -> list[Checkpoint]:
        """Rank 0's view of the committed checkpoints of `role`, given to every rank."""
        box = [self.store.list(role) if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return list(box[0] or [])

    # ------------------------------------------------------------------------------------------------ saving

    def save(self, step: int, roles: list[Role], contents: Contents, state: dict[str, Stateful]) -> None:
        """Save one set of bytes for `roles` at `step` (the first role is written, the others linked)."""
        self.wait()
        # Recovery is written and the other role linked to it: recovery is kept longest, and `latest` names it.
        ordered = sorted(roles, key=lambda role: role is not Role.RECOVERY)
        checkpoints = [Checkpoint(role, step) for role in ordered]
        self._start(PendingSave(checkpoints, contents, time.perf_counter(), extra=_data_position(state)), state)

    def consider_best_k(self, step: int, value: float, state_factory: Callable[[], dict[str, Stateful]]) -> bool:
        """Save a parameters-only best-K checkpoint when `value` ranks in the top best_k."""
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
        self.wait()
        ckpt = Checkpoint(Role.BEST_K, step, metric=value, metric_name=self.policy.best_k_metric)
        self.best = [c for c in self.best if c not in decision.evict] + [ckpt]
        state = state_factory()
        pending = PendingSave([ckpt], Contents.PARAMS, time.perf_counter(), extra=_data_position(state))
        if self.is_main:
            self.journal.append(
                "best_k",
                step,
                metric=self.policy.best_k_metric,
                value=value,
                reason=decision.reason,
                evict=[c.relpath for c in decision.evict],
            )
        self._start(pending, state)
        return True

    def _start(self, pending: PendingSave, state: dict[str, Stateful]) -> None:
        first = pending.checkpoints[0]
        # Rank 0 prepares the staging directory (removing any leftover of a crashed save of the same name)
        # before DCP's planning collective lets the other ranks write into it.
        box = [str(self.store.staging_dir(first)) if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        pending.staging = Path(box[0])
        started = time.perf_counter()
        if self.async_save:
            pending.future = io.async_save(state, pending.staging, self.group)
            pending.blocking_seconds = time.perf_counter() - started
            self.pending = pending
        else:
            try:
                io.save(state, pending.staging, self.group)
            except Exception as err:  # e.g. a full disk: every committed checkpoint is still there; say so
                self._journal_error(first, f"save failed: {err!r}; earlier checkpoints are intact")
                raise
            pending.known = self._gather_own_checksums(pending.staging)
            pending.blocking_seconds = time.perf_counter() - started
            self._finish(pending)

    def _gather_own_checksums(self, staging: Path) -> dict[str, FileEntry]:
        """Each rank checksums the shard files it wrote, in parallel, and rank 0 gets them all: rank 0 alone
        re-reading every rank's bytes would take minutes for a large model."""
        own = {p.name: file_entry(p) for p in sorted(staging.glob(f"__{self.rank}_*.distcp"))}
        gathered: list[dict[str, FileEntry] | None] = [None] * dist.get_world_size(self.group) if self.is_main else []
        dist.gather_object(own, gathered if self.is_main else None, dst=0, group=self.group)
        return {k: v for part in gathered if part for k, v in part.items()}

    def poll(self) -> None:
        """Start committing an asynchronous save whose bytes are all written; cheap when nothing is pending."""
        pending = self.pending
        if pending is not None and pending.future is not None and pending.future.done() and pending.committer is None:
            self._begin_commit(pending)

    def wait(self) -> None:
        """Block until the pending asynchronous save (if any) is written and committed."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        assert pending.future is not None
        try:
            pending.future.result()
        except Exception as err:  # the write failed: keep every existing checkpoint, say what happened
            self._journal_error(pending.checkpoints[0], f"asynchronous save failed: {err!r}")
            raise
        if pending.committer is None:
            self._begin_commit(pending)
        assert pending.committer is not None
        pending.committer.join()
        if pending.commit_error is not None:
            raise pending.commit_error

    def _begin_commit(self, pending: PendingSave) -> None:
        """Commit in a thread of rank 0's: fsync and checksums of a large checkpoint take long, and they touch only
        the filesystem and the journal (no collectives), so training need not wait for them."""

        def commit() -> None:
            try:
                if self.is_main:
                    self._commit(pending)
            except Exception as err:
                pending.commit_error = err
                self._journal_error(pending.checkpoints[0], f"commit failed: {err!r}; earlier checkpoints are intact")

        pending.committer = threading.Thread(target=commit, name="curry-train-commit")
        pending.committer.start()

    def _finish(self, pending: PendingSave) -> None:
        if self.is_main:
            self._commit(pending)

    def _commit(self, pending: PendingSave) -> None:
        first = pending.checkpoints[0]
        # What a resume needs to know before loading: how much the checkpoint holds, and how many ranks wrote it.
        extra = {"contents": pending.contents.value, "world_size": dist.get_world_size(self.group), **pending.extra}
        committing = time.perf_counter()
        manifest = self.store.commit(first, pending.staging, extra=extra, known=pending.known)
        if pending.committer is None:  # a synchronous save commits on the training thread
            pending.blocking_seconds += time.perf_counter() - committing
        seconds = time.perf_counter() - pending.started
        self._journal_save(
            first,
            manifest.total_bytes,
            pending.contents,
            seconds=round(seconds, 4),
            blocking_seconds=round(pending.blocking_seconds, 4),
        )
        for ckpt in pending.checkpoints[1:]:
            linked = self.store.link(first, ckpt)
            self._journal_save(ckpt, linked.total_bytes, pending.contents, seconds=0.0, linked_from=first.relpath)
        if pending.contents is Contents.FULL:
            self.store.set_latest(first)
        self._apply_retention(first.step)

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
