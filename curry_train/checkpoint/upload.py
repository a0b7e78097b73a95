"""Copying committed checkpoints to the remote store in the background, one save per role in flight.

Each rank uploads the files it wrote itself (no funnel through rank 0), from hard links taken when the local
checkpoint committed (so local retention may delete the checkpoint meanwhile). Rank 0 then waits until the store
holds every file of the manifest with its size, uploads the manifest (the remote commit), moves the remote
`latest` and applies the remote retention. No thread issues a collective: whether a role's upload is still in
flight is agreed on the training thread, at the commit every rank hears (`submit_committed`), and the ranks meet again
only through the objects in the store.

A failed operation is retried with backoff for `checkpoint.remote_retry_s`; training never waits for it, except
for the run's end, which waits for the uploads in flight so that a finished run's last checkpoint is remote.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.distributed as dist

from curry_train.checkpoint import io
from curry_train.checkpoint.commit import journal_save
from curry_train.checkpoint.durable import link_or_copy
from curry_train.checkpoint.manifest import Manifest, file_entry
from curry_train.checkpoint.policy import Checkpoint, Contents, Policy, Role, retention
from curry_train.checkpoint.remote import LeaseLost, RemoteStore, describe_error
from curry_train.checkpoint.store import RunDir
from curry_train.config import CheckpointConfig
from curry_train.journal import Journal, append_from_any_rank
from curry_train.layout import RunFiles


@dataclass
class RemoteCommit:
    """Rank 0's part of a node-local save (no node commits): `.metadata` from every rank's write results, and the
    manifests that commit it on the remote."""

    job: io.SaveJob
    written: list[io.Written]  # every rank's report
    contents: Contents
    extra: dict[str, object]
    started: float


@dataclass
class UploadJob:
    """One committed save's files of this rank, for the checkpoints of remote roles that hold them."""

    checkpoints: list[Checkpoint]  # the first's role is the lane; all get the same files
    local: Path  # this rank's hard links of its own files
    names: list[str]
    manifests: list[Manifest]  # rank 0: the manifest of each checkpoint, uploaded last
    committed_at: float
    commit: RemoteCommit | None = None  # node-local mode, rank 0: the manifests are made here first

    @property
    def lane(self) -> Role:
        return self.checkpoints[0].role


class Uploader:
    def __init__(
        self,
        remote: RemoteStore,
        run_dir: Path,
        rank: int,
        journal: Journal,
        policy: Policy,
        roles: frozenset[Role],
        retry_s: float,
        stall_at: int | None = None,
    ) -> None:
        self.remote = remote
        self.run_dir = run_dir
        self.rank = rank
        self.journal = journal
        self.policy = policy  # the remote keeps
        self.roles = roles
        self.retry_s = retry_s
        self.stall_at = stall_at  # +debug.upload_stall_at: uploads of checkpoints from this step stall after a file
        self.lanes: dict[Role, threading.Thread] = {}
        # Per lane: the newest commit not uploaded because the lane was busy, and this rank's files of it.
        self.skipped: dict[Role, tuple[list[Checkpoint], list[str]]] = {}

    # -- on the training thread

    def busy(self) -> list[int]:
        """Per role (in Role order), 1 while its lane uploads: the ranks agree on it with one MAX all-reduce."""
        return [int(role in self.lanes and self.lanes[role].is_alive()) for role in Role]

    def wanted(self, checkpoints: list[Checkpoint]) -> list[Checkpoint]:
        return [c for c in checkpoints if c.role in self.roles]

    def submit_committed(
        self, checkpoints: list[Checkpoint], names: list[str], store: RunDir, group: dist.ProcessGroup
    ) -> None:
        """Every rank, once all have heard that `checkpoints` committed: hand this rank's files of them (`names`)
        to their lane. Whether a lane is still busy anywhere is agreed here (one tiny all-reduce a commit), so every
        rank uploads the same saves and rank 0's manifest never waits for files that never come."""
        if not self.wanted(checkpoints):
            return
        busy = torch.tensor(self.busy(), dtype=torch.int32)
        dist.all_reduce(busy, op=dist.ReduceOp.MAX, group=group)
        wanted = [c for c in self.wanted(checkpoints) if store.is_committed(c)]
        if not wanted:
            return
        manifests = [store.manifest(c) for c in wanted] if self.rank == 0 else []
        self.submit(wanted, store.path_of(wanted[0]), names, manifests, busy.tolist())

    def finish(self, store: RunDir, group: dist.ProcessGroup) -> None:
        """At the run's end (every rank, its saves committed): wait for the uploads in flight, then upload the
        newest commit of each role that a busy lane skipped, so that a finished run's newest checkpoints are remote."""
        self.join()
        for checkpoints, names in list(self.skipped.values()):
            self.submit_committed(checkpoints, names, store, group)
        self.join()

    def submit(
        self,
        checkpoints: list[Checkpoint],
        source: Path,
        names: list[str],
        manifests: list[Manifest],
        busy: list[int],
    ) -> None:
        """Upload this rank's `names` of the committed checkpoint at `source` for each of `checkpoints` (those of
        remote roles), unless that lane is busy on any rank (`busy`, agreed): then it is noted as skipped, and the
        run's end uploads the newest skipped one."""
        checkpoints = self.wanted(checkpoints)
        if not checkpoints:
            return
        lane = checkpoints[0].role
        if busy[list(Role).index(lane)]:
            self.skipped[lane] = (checkpoints, names)
            self._journal(
                "upload_skipped",
                checkpoints[0].step,
                path=checkpoints[0].relpath,
                reason=f"the previous {lane.value} upload is still in flight (one per role)",
            )
            return
        self.skipped.pop(lane, None)
        local = RunFiles(self.run_dir).uploads / str(self.rank) / checkpoints[0].name  # this rank's hard links
        if local.exists():
            shutil.rmtree(local)
        for name in names:
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(source / name, local / name)
        job = UploadJob(checkpoints, local, names, manifests, time.perf_counter())
        thread = threading.Thread(target=self._run, args=(job,), name=f"curry-train-upload-{lane.value}", daemon=True)
        self.lanes[lane] = thread
        thread.start()

    def submit_written(
        self, checkpoints: list[Checkpoint], staging: Path, names: list[str], commit: RemoteCommit | None
    ) -> None:
        """Node-local mode, every rank once all have reported their files durable: upload this rank's `names` from
        its `staging` (removed afterwards), rank 0 with `commit`. Nothing else holds the save, so a lane still busy
        with the previous one is waited for (backpressure on training), never skipped."""
        lane = checkpoints[0].role
        previous = self.lanes.get(lane)
        if previous is not None and previous.is_alive():
            waited = time.perf_counter()
            previous.join()
            self._journal(
                "upload_wait",
                checkpoints[0].step,
                path=checkpoints[0].relpath,
                seconds=round(time.perf_counter() - waited, 4),
                reason=f"the previous {lane.value} upload was still in flight (node-local mode: backpressure)",
            )
        job = UploadJob(checkpoints, staging, names, [], time.perf_counter(), commit)
        thread = threading.Thread(target=self._run, args=(job,), name=f"curry-train-upload-{lane.value}", daemon=True)
        self.lanes[lane] = thread
        thread.start()

    def join(self) -> None:
        for thread in self.lanes.values():
            thread.join()

    # -- in a lane's thread

    def _run(self, job: UploadJob) -> None:
        deadline = time.monotonic() + self.retry_s
        delay = 0.5
        try:
            if job.commit is not None:
                try:
                    job.manifests = self._manifests(job.checkpoints, job.local, job.commit)
                except Exception as err:
                    self._journal(
                        "upload_error",
                        job.checkpoints[0].step,
                        path=job.checkpoints[0].relpath,
                        rank=self.rank,
                        reason=f"cannot finish the checkpoint's metadata: {err!r}",
                    )
                    return
            while True:
                try:
                    self._upload(job)
                    return
                except Exception as err:
                    lost = isinstance(err, LeaseLost)  # final: another launch holds the run's remote now
                    if lost or time.monotonic() + delay > deadline:
                        said = (
                            str(err)
                            if lost
                            else f"gave up after {self.retry_s:g} s: {describe_error(self.remote.url, err)}"
                        )
                        self._journal(
                            "upload_error",
                            job.checkpoints[0].step,
                            path=job.checkpoints[0].relpath,
                            rank=self.rank,
                            reason=said,
                        )
                        return
                    time.sleep(delay)
                    delay = min(delay * 2, 10.0)
        finally:
            shutil.rmtree(job.local, ignore_errors=True)

    def _upload(self, job: UploadJob) -> None:
        first = job.checkpoints[0]
        for checkpoint in job.checkpoints:
            for number, name in enumerate(job.names):
                self.remote.put_file(job.local / name, f"{checkpoint.relpath}/{name}")
                if number == 0 and self.stall_at is not None and checkpoint.step >= self.stall_at:
                    print(
                        f"curry-train: debug: upload of {checkpoint.relpath} stalls (rank {self.rank})", file=sys.stderr
                    )
                    sys.stderr.flush()
                    threading.Event().wait()
        if self.rank != 0:
            return
        delay = 0.05
        for manifest, checkpoint in zip(job.manifests, job.checkpoints, strict=True):
            # The other ranks' files come on their own schedule; the manifest waits for all of them.
            while missing := self.remote.missing(checkpoint.relpath, manifest.files):
                time.sleep(delay)
                delay = min(delay * 1.5, 2.0)
                if time.perf_counter() - job.committed_at > self.retry_s:
                    raise TimeoutError(f"{len(missing)} file(s) of other ranks never arrived, e.g. {missing[0]}")
            self.remote.put_manifest(manifest, checkpoint.relpath)
        if job.commit is not None:
            self._journal_remote_saves(job)
        full = [c for c, m in zip(job.checkpoints, job.manifests, strict=True) if m.contents is Contents.FULL]
        latest = self.remote.latest()
        if full and (latest is None or full[0].step >= latest.step):
            self.remote.set_latest(full[0])
        self.put_run_files()
        self._journal(
            "upload",
            first.step,
            path=first.relpath,
            linked=[c.relpath for c in job.checkpoints[1:]],
            bytes=job.manifests[0].total_bytes,
            seconds=round(time.perf_counter() - job.committed_at, 4),
        )
        self._apply_retention()

    def put_run_files(self) -> str | None:
        """Rank 0, after each remote commit and at the launch's end: `put_run_files`."""
        return put_run_files(self.remote, self.run_dir)

    def _manifests(self, checkpoints: list[Checkpoint], staging: Path, commit: RemoteCommit) -> list[Manifest]:
        """Rank 0, node-local mode: write `.metadata` and make each checkpoint's manifest from what the ranks
        reported (their files are on their own nodes: only `.metadata` is read here)."""
        from curry_train.checkpoint.node_local import metadata_problem

        commit.job.finish_metadata([w.results for w in commit.written])
        files = {name: entry for w in commit.written for name, entry in w.files.items()}
        problem = metadata_problem(staging, set(files))
        if problem is not None:
            raise RuntimeError(problem)
        files[".metadata"] = file_entry(staging / ".metadata")
        extra = {"contents": commit.contents.value, "world_size": len(commit.written), **commit.extra}
        created = datetime.now(UTC).isoformat(timespec="milliseconds")
        first = checkpoints[0]
        return [
            Manifest(
                c.role,
                c.step,
                c.name,
                created,
                dict(files),
                c.metric,
                c.metric_name,
                dict(extra),
                linked_from=None if c == first else first.relpath,
            )
            for c in checkpoints
        ]

    def _journal_remote_saves(self, job: UploadJob) -> None:
        """Node-local mode: the save is committed now that its manifest is on the remote."""
        assert job.commit is not None
        seconds = round(time.perf_counter() - job.commit.started, 4)
        for checkpoint, manifest in zip(job.checkpoints, job.manifests, strict=True):
            journal_save(
                self.journal,  # rank 0's: only rank 0 holds a commit
                checkpoint,
                manifest.total_bytes,
                job.commit.contents,
                seconds=seconds,
                write_seconds=round(max(w.seconds for w in job.commit.written), 4),
                committed="remote",
                **({"linked_from": manifest.linked_from} if manifest.linked_from else {}),
            )

    def _apply_retention(self) -> None:
        listing = self.remote.list()
        latest = self.remote.latest()
        protected = {latest.relpath} if latest else set()
        for deletion in retention(self.policy, [c for c in listing if c.role in self.roles], protected):
            self.remote.delete(deletion.checkpoint.relpath)
            self._journal(
                "remote_delete", deletion.checkpoint.step, path=deletion.checkpoint.relpath, reason=deletion.reason
            )

    def _journal(self, event: str, step: int, **fields: object) -> None:
        """Rank 0 journals; another rank has only its own failures to tell, through the file rank 0 writes."""
        if self.rank == 0:
            self.journal.append(event, step, **fields)
        elif event == "upload_error":
            append_from_any_rank(self.run_dir, event, step, **fields)


def put_run_files(remote: RemoteStore, run_dir: Path) -> str | None:
    """The run's journal, metrics and config to the remote; what went wrong, if anything (they go again with the next
    commit or launch)."""
    try:
        remote.put_run_files(run_dir)
    except Exception as err:
        return describe_error(remote.url, err)
    return None


def remote_policy(policy: Policy, rollback_keep: int | None, recovery_keep: int | None) -> Policy:
    """The local policy with the remote keeps (None: the local keep)."""
    return dataclasses.replace(
        policy,
        rollback_keep=policy.rollback_keep if rollback_keep is None else rollback_keep,
        recovery_keep=policy.recovery_keep if recovery_keep is None else recovery_keep,
    )


def remove_local_leftovers(run_dir: Path) -> None:
    """Hard links of uploads a kill cut short (rank 0, at start)."""
    shutil.rmtree(RunFiles(run_dir).uploads, ignore_errors=True)


def build(c: CheckpointConfig, run_dir: Path, rank: int, journal: Journal, stall_at: int | None) -> Uploader | None:
    """The uploader of `checkpoint.remote`, or None without one."""
    if c.remote is None:
        return None
    return Uploader(
        RemoteStore(c.remote, run_dir.name),
        run_dir,
        rank,
        journal,
        remote_policy(c.policy(), c.remote_rollback_keep, c.remote_recovery_keep),
        frozenset(Role(r) for r in c.remote_roles),
        c.remote_retry_s,
        stall_at,
    )
