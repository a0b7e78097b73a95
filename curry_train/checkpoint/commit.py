"""Rank 0's part of a save, once every rank reported its files durable: `.metadata`, the run directory's commit,
the links of the other roles, `latest`, retention, and the journal line of each. No collective runs here: the
checkpointer calls it from its commit thread (or inline), and every rank hears how it went at the next poll.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

from curry_train.checkpoint import io
from curry_train.checkpoint.pending import PendingSave
from curry_train.checkpoint.policy import Checkpoint, Contents, Policy, retention
from curry_train.checkpoint.store import RunDir
from curry_train.journal import Deferred, Journal


class Committer:
    """Commits saves into `store`, journaling each event. `world_size` goes into every manifest (a resume needs it
    before loading); `mode` ("async" or "sync") and `writer` ("process" or "thread") into every save's journal line,
    so that a journal read later says how its figures were made. Retention follows the policy each call is given: an
    automatic cadence changes the checkpointer's policy as the run goes."""

    def __init__(self, store: RunDir, journal: Journal, world_size: int, mode: str, writer: str) -> None:
        self.store, self.journal = store, journal
        self.world_size, self.mode, self.writer = world_size, mode, writer
        self._removals: list[threading.Thread] = []

    def close(self) -> None:
        """Wait for the deleted checkpoints' bytes to be freed (the launch is done saving)."""
        for thread in self._removals:
            thread.join()
        self._removals = []

    def _remove_later(self, trash: Path) -> None:
        """Free a deleted checkpoint's bytes in a thread of their own. Once renamed to `.trash-` it is gone for every
        reader (never listed; a start removes what is left of it), so neither the commit nor, behind a synchronous
        save's inline commit, the training thread waits for the filesystem to free hundreds of megabytes."""
        self._removals = [t for t in self._removals if t.is_alive()]
        thread = threading.Thread(
            target=shutil.rmtree, args=(trash,), kwargs={"ignore_errors": True}, name="curry-train-remove"
        )
        thread.start()
        self._removals.append(thread)

    def commit(self, pending: PendingSave, policy: Policy) -> None:
        """A durable save: its first checkpoint committed, the others linked to it, `latest` moved (full state),
        its best-K parameters copy committed, then retention."""
        first = pending.checkpoints[0]
        assert pending.job is not None
        nbytes = self.commit_written(first, pending.job, pending.written, pending.contents, pending.extra)
        blocking, cost = pending.costs(time.perf_counter())
        self.journal_save(
            first,
            nbytes,
            pending.contents,
            seconds=round(time.perf_counter() - pending.started, 4),
            blocking_seconds=round(blocking, 4),
            cost_seconds=None if cost is None else round(cost, 4),
            stage_seconds=round(pending.stage_seconds, 4),
            snapshot_wait_seconds=round(pending.snapshot_wait_seconds, 4),
            write_seconds=round(max(w.seconds for w in pending.written), 4),
            write_cpu_seconds=round(max(w.cpu_seconds for w in pending.written), 4),
            direct_io=all(w.direct for w in pending.written),
            mode=self.mode,
            writer=self.writer,
        )
        for checkpoint in pending.checkpoints[1:]:
            linked = self.store.link(first, checkpoint)
            self.journal_save(checkpoint, linked.total_bytes, pending.contents, seconds=0.0, linked_from=first.relpath)
        if pending.contents is Contents.FULL:
            self.store.set_latest(first)
        copy = pending.params_copy
        if copy is not None:
            nbytes = self.commit_written(copy.checkpoint, copy.job, copy.written, Contents.PARAMS, pending.extra)
            self.journal_save(
                copy.checkpoint,
                nbytes,
                Contents.PARAMS,
                seconds=round(time.perf_counter() - pending.started, 4),
                write_seconds=round(max(w.seconds for w in copy.written), 4),
                mode=self.mode,
                writer=self.writer,
                params_of=first.relpath,  # the save it shares a staged copy (and a step) with
            )
        self.apply_retention(first.step, policy)

    def commit_written(
        self,
        checkpoint: Checkpoint,
        job: io.SaveJob,
        written: list[io.Written],
        contents: Contents,
        extra: dict[str, Any],
    ) -> int:
        """`.metadata`, the checks of what the ranks reported, and the store's commit; the bytes committed."""
        job.finish_metadata([w.results for w in written])
        known = {name: entry for w in written for name, entry in w.files.items()}
        io.check_reported(job.staging, known)
        # What a resume needs to know before loading: how much the checkpoint holds, and how many ranks wrote it.
        extra = {"contents": contents.value, "world_size": self.world_size, **extra}
        # Every data file was fsynced by its rank's writer before that rank reported it, and `.metadata` by
        # FileSystemWriter.finish (sync_files=True): the commit fsyncs only directories and the manifest.
        durable = frozenset(known) | {".metadata"}
        return self.store.commit(checkpoint, job.staging, extra=extra, known=known, durable=durable).total_bytes

    def link(self, source: Checkpoint, checkpoint: Checkpoint, policy: Policy) -> None:
        """`checkpoint` as hard links of the committed `source`, journaled, then retention."""
        linked = self.store.link(source, checkpoint)
        self.journal_save(
            checkpoint,
            linked.total_bytes,
            linked.contents or Contents.PARAMS,  # a save's manifest always names it
            seconds=0.0,
            linked_from=source.relpath,
        )
        self.apply_retention(checkpoint.step, policy)

    def journal_error(self, checkpoint: Checkpoint, reason: str) -> None:
        self.journal.append("error", checkpoint.step, role=checkpoint.role, path=checkpoint.relpath, reason=reason)

    def journal_save(self, checkpoint: Checkpoint, nbytes: int, contents: Contents, **fields: Any) -> None:
        journal_save(self.journal, checkpoint, nbytes, contents, **fields)

    def apply_retention(self, step: int, policy: Policy) -> None:
        """Delete what the policy no longer keeps (never `latest`), and the oldest checkpoints a rollback set aside
        beyond `abandoned_keep`; each deletion journaled with its reason."""
        latest = self.store.latest()
        protected = {latest.relpath} if latest else set()
        for deletion in retention(policy, self.store.list(), protected):
            freed = self.store.delete(deletion.checkpoint, remove=self._remove_later)
            self.journal.append(
                "delete",
                deletion.checkpoint.step,
                role=deletion.checkpoint.role,
                path=deletion.checkpoint.relpath,
                bytes=freed,
                reason=deletion.reason,
            )
        abandoned = self.store.abandoned()
        for item in abandoned[: max(0, len(abandoned) - policy.abandoned_keep)]:
            self.journal.append(
                "delete",
                step,
                role=item.role,
                path=item.relpath,
                bytes=self.store.remove_abandoned(item),
                reason=f"abandoned_keep={policy.abandoned_keep} exceeded (set aside by a rollback)",
            )


def journal_save(
    journal: Journal | Deferred, checkpoint: Checkpoint, nbytes: int, contents: Contents | None, **fields: Any
) -> None:
    """The `save` line of a committed checkpoint (in the run directory, or on the remote in node-local mode, or found
    at a start without its line): its role, path, bytes and contents, and what else the writer knows."""
    journal.append(
        "save",
        checkpoint.step,
        role=checkpoint.role,
        path=checkpoint.relpath,
        bytes=nbytes,
        contents=contents,
        **fields,
    )
