"""A launch's start with `checkpoint.remote`: every rank can write the store (or the launch is refused, status 2),
what a kill cut short is removed, and a resume takes the newest committed checkpoint, local or remote, fetching it
into the run directory when only the remote has it (new nodes, purged scratch, a deleted run directory).
"""

from __future__ import annotations

import time
from typing import Any

import torch.distributed as dist

from curry_train import distributed
from curry_train.checkpoint.manifest import Manifest
from curry_train.checkpoint.node_local import NodeLocal, fetch_everywhere
from curry_train.checkpoint.policy import Checkpoint, Contents
from curry_train.checkpoint.remote import RemoteError, RemoteStore
from curry_train.checkpoint.resume import ResumeError
from curry_train.checkpoint.store import RunDir
from curry_train.checkpoint.upload import remove_local_leftovers
from curry_train.config import Launch
from curry_train.distributed import on_rank0
from curry_train.failures import Refused
from curry_train.journal import Deferred, Journal


def start(
    url: str | None,
    store: RunDir,
    launch: Launch,
    env: distributed.Dist,
    journal: Journal | Deferred,
    node: NodeLocal | None = None,
) -> str | None:
    """Probe the store from every rank, tidy it (rank 0), and fetch a newer remote checkpoint for +resume=latest or
    auto (`node`, nodes without a shared filesystem: the remote's newest into every node); returns the URL of the
    checkpoint fetched, if any. After the local run directory was tidied."""
    if url is None:
        return None
    remote = probe_everywhere(url, store, env)
    on_rank0(env.is_main, env.checkpoint_group, tidy, remote, store, journal)
    if launch.rollback_to is not None or launch.resume not in ("latest", "auto"):
        return None
    if node is not None:
        return fetch_everywhere(remote, store, env, node, journal)
    return fetch_newer(remote, store, env, journal)


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
    names = sorted(manifest.files)[env.rank :: env.world_size]
    mine = remote.fetch(checkpoint, names, staging, manifest.files)
    everyone: list[Any] = [None] * env.world_size
    dist.all_gather_object(everyone, mine, group=group)
    problems = [p for part in everyone for p in part]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ResumeError(f"checkpoint.remote: {remote.url}/{checkpoint.relpath}: {problems[0]}{more}")
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
