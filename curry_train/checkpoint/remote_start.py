"""A launch's start with `checkpoint.remote`: every rank can write the store (or the launch is refused, status 2),
the launch takes the run's lease (one writer across nodes; a live holder refuses it, status 2), what a kill cut
short is removed, and a resume takes the newest committed checkpoint, local or remote, fetching it
into the run directory when only the remote has it (new nodes, purged scratch, a deleted run directory).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist

from curry_train import distributed
from curry_train.checkpoint import lease_store
from curry_train.checkpoint.lease import Verdict
from curry_train.checkpoint.manifest import Manifest
from curry_train.checkpoint.node_local import NodeLocal, fetch_everywhere, fetch_share
from curry_train.checkpoint.policy import Checkpoint, Contents
from curry_train.checkpoint.remote import RemoteError, RemoteStore, guard
from curry_train.checkpoint.resume import ResumeError
from curry_train.checkpoint.store import RunDir
from curry_train.checkpoint.upload import remove_local_leftovers
from curry_train.config import Launch
from curry_train.distributed import on_rank0
from curry_train.failures import Refused
from curry_train.journal import Deferred, Journal, append_from_any_rank, read_journal
from curry_train.layout import RunFiles

DEFAULT_LEASE_S = 300.0  # checkpoint.remote_lease_s's default

# The lease this process holds (rank 0) or follows (other ranks), until the launch ends: `lease_scope`.
_lease: lease_store.HeldLease | lease_store.FollowedLease | None = None
_lease_url: str | None = None


def start(
    url: str | None,
    store: RunDir,
    launch: Launch,
    env: distributed.Dist,
    journal: Journal | Deferred,
    lease_s: float = DEFAULT_LEASE_S,
    node: NodeLocal | None = None,
) -> str | None:
    """Probe the store from every rank, take the run's lease, tidy the store (rank 0), and fetch a newer remote
    checkpoint for +resume=latest or auto (`node`, nodes without a shared filesystem: the remote's newest into every
    node); returns the URL of the checkpoint fetched, if any. After the local run directory was tidied."""
    if url is None:
        return None
    remote = probe_everywhere(url, store, env)
    take_lease(remote, store.path, lease_s, env, journal)
    if env.is_main and not RunFiles(store.path).journal.exists():
        restore_run_files(remote, store)
    on_rank0(env.is_main, env.checkpoint_group, tidy, remote, store, journal)
    if launch.rollback_to is not None or launch.resume not in ("latest", "auto"):
        return None
    if node is not None:
        return fetch_everywhere(remote, store, env, node, journal)
    return fetch_newer(remote, store, env, journal)


def restore_run_files(remote: RemoteStore, store: RunDir) -> None:
    """Rank 0, a run directory without a journal (new nodes, a deleted or purged directory): the remote's journal,
    metrics and config, so that the run's history and its attempts go on where they were."""
    fetched = remote.get_run_files(store.path)
    if fetched:
        print(f"curry-train: took {', '.join(fetched)} of this run from {remote.url}", file=sys.stderr, flush=True)


def probe_everywhere(url: str, store: RunDir, env: distributed.Dist) -> RemoteStore:
    """Each rank uploads its own files, so each must be able to write the store: a write/read/delete probe on every
    rank, and one line naming the first that failed."""
    try:
        remote = RemoteStore(url, store.path.name, quick=True)
        remote.probe(f"rank{env.rank}")
        mine = None
    except RemoteError as err:
        mine = str(err)
    everyone: list[Any] = [None] * env.world_size
    dist.all_gather_object(everyone, mine, group=env.checkpoint_group)
    failed = [(rank, line) for rank, line in enumerate(everyone) if line is not None]
    if failed:
        rank, line = failed[0]
        more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
        where = "" if env.world_size == 1 else f" (rank {rank}{more})"
        raise Refused(f"{line}{where}")
    return remote


def tidy(remote: RemoteStore, store: RunDir, journal: Journal | Deferred) -> None:
    """Rank 0: remove remote checkpoints without a manifest (an upload or a deletion a kill cut short: never
    resumed) and this run directory's hard links of uploads that never finished."""
    remove_local_leftovers(store.path)
    for relpath in remote.uncommitted():
        remote.delete(relpath)
        journal.append(
            "remote_delete", 0, path=relpath, reason="no manifest: an upload or deletion cut short (never resumed)"
        )


def newer_remote(remote: RemoteStore, store: RunDir) -> tuple[Checkpoint, Manifest] | None:
    """Rank 0: the remote's newest committed checkpoint, when the run directory has nothing as new."""
    newest = remote.latest()
    if newest is None:
        return None
    local = store.latest() or store.newest_full()
    if local is not None and local.step >= newest.step:
        return None
    return newest, remote.manifest(newest)


def fetch_newer(remote: RemoteStore, store: RunDir, env: distributed.Dist, journal: Journal | Deferred) -> str | None:
    """Download the remote's newest checkpoint when it is newer than the local one: each rank a share of its files
    (in parallel), each file checked against the manifest, then rank 0 commits it locally as if it had saved it."""
    group = env.checkpoint_group
    newer = on_rank0(env.is_main, group, newer_remote, remote, store)
    if newer is None:
        return None
    checkpoint, manifest = newer
    started = time.perf_counter()
    staging = on_rank0(env.is_main, group, store.staging_dir, checkpoint)
    fetch_share(remote, checkpoint, sorted(manifest.files)[env.rank :: env.world_size], staging, manifest, group)
    on_rank0(env.is_main, group, commit_fetched, store, checkpoint, staging, manifest)
    journal.append(
        "remote_fetch",
        checkpoint.step,
        path=checkpoint.relpath,
        bytes=manifest.total_bytes,
        seconds=round(time.perf_counter() - started, 4),
        reason="the remote's newest committed checkpoint is newer than the run directory's",
    )
    return f"{remote.url}/{checkpoint.relpath}"


def commit_fetched(store: RunDir, checkpoint: Checkpoint, staging: Any, manifest: Manifest) -> None:
    store.commit(checkpoint, staging, extra=manifest.extra, known=manifest.files)
    if manifest.contents is Contents.FULL:
        store.set_latest(checkpoint)


# ------------------------------------------------------------------------------------------------------ the lease


def take_lease(
    remote: RemoteStore, run_dir: Path, lease_s: float, env: distributed.Dist, journal: Journal | Deferred
) -> None:
    """Rank 0 takes the run's lease (or every rank raises Refused: a live holder); then every rank guards its
    remote writes with it: rank 0 with its renewal state, the others by reading the lease object."""
    global _lease, _lease_url
    held: list[lease_store.HeldLease] = []  # rank 0's, filled by _take
    token = on_rank0(env.is_main, env.checkpoint_group, _take, remote, run_dir, lease_s, journal, held)
    _lease = held[0] if env.is_main else lease_store.follow(remote, token)
    _lease_url = remote.url
    guard(remote.url, _lease.check)


def _take(remote: RemoteStore, run_dir: Path, lease_s: float, journal: Journal | Deferred, held: list[Any]) -> str:
    journal_path = RunFiles(run_dir).journal
    attempt = sum(e["event"] == "run_start" for e in read_journal(journal_path)) if journal_path.exists() else 0

    def lost(reason: str) -> None:
        print(f"curry-train: WARNING: checkpoint.remote: lease lost, no more uploads: {reason}", file=sys.stderr)
        append_from_any_rank(run_dir, "lease_lost", None, url=remote.url, reason=reason)

    lease, verdict, previous, guaranteed = lease_store.take(remote, attempt, lease_s, lost)
    held.append(lease)
    fields: dict[str, Any] = {"url": remote.url, "how": verdict.value, "lease_s": lease_s}
    if previous is not None and verdict is not Verdict.FREE:
        fields["previous"] = {"host": previous.host, "pid": previous.pid, "attempt": previous.attempt}
    if not guaranteed:
        fields["guaranteed"] = False
        print(
            f"curry-train: WARNING: checkpoint.remote: {remote.url} does not honour conditional writes: the one-writer "
            "lease is best effort (docs/checkpoints.md)",
            file=sys.stderr,
        )
    journal.append("lease", 0, **fields)
    return lease.holder.token


def end_lease(clean: bool) -> None:
    """The launch ends: a clean end (done, preempted, refused) releases the lease, so the next launch need not wait;
    a failure only stops renewing it (it expires, or is taken over at once from this host once the process is
    gone). Remote writes of this process stop either way."""
    global _lease, _lease_url
    if _lease is None:
        return
    (_lease.release if clean else _lease.stop)()
    if _lease_url is not None:
        guard(_lease_url, None)
    _lease = _lease_url = None


@contextlib.contextmanager
def lease_scope() -> Iterator[None]:
    """Around a launch's training: the lease taken at its start is released at a clean end (a return, a refusal,
    a spike the run could not roll back from), only left to expire after a failure."""
    from curry_train.checkpoint.rollback import SpikeError
    from curry_train.config import ConfigError

    try:
        yield
    except (Refused, ConfigError, ResumeError, SpikeError):
        end_lease(clean=True)
        raise
    except BaseException:
        end_lease(clean=False)
        raise
    end_lease(clean=True)
