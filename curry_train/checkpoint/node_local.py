"""Nodes without a shared filesystem (`checkpoint.remote` set, each node its own `run.root`): "node-local" mode.

Each node's run directory holds only its own ranks' files, so no node can commit a checkpoint: every rank writes
its files into `.uploads/<rank>/<relpath>/` on its own disk and uploads them, rank 0 also `.metadata` and, once
every rank's files are on the remote, the manifest; the manifest on the remote is the commit (see upload.py). A
resume fetches the remote's newest committed checkpoint into every node's run directory, each node's ranks
splitting its files, and commits it there; DCP then loads it as any local checkpoint.

Rank 0's node keeps the journal, metrics and config; the others' run directories hold no lock and no journal.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from curry_train import distributed
from curry_train.checkpoint.manifest import Manifest
from curry_train.checkpoint.policy import Checkpoint, Contents
from curry_train.checkpoint.remote import RemoteStore
from curry_train.checkpoint.store import TMP_PREFIX, RunDir
from curry_train.config import Config, ConfigError, Launch
from curry_train.journal import Deferred, Journal
from curry_train.layout import RunFiles


@dataclass(frozen=True)
class NodeLocal:
    """This rank's view of the nodes: the ranks that share its run directory (its node, itself included)."""

    rank: int
    peers: tuple[int, ...]
    nodes: int  # how many run directories the job has

    @property
    def leader(self) -> bool:
        """The rank that tidies and commits in this node's run directory (rank 0 on rank 0's node)."""
        return self.rank == self.peers[0]


def probe_nodes(run_dir: Path, env: distributed.Dist) -> NodeLocal:
    """Which ranks share a run directory: each writes a probe file into its own and looks for the others'."""
    run_dir.mkdir(parents=True, exist_ok=True)
    mine = run_dir / f".probe-rank{env.rank}-{uuid.uuid4().hex[:8]}"
    mine.write_text(str(env.rank))
    names: list[Any] = [None] * env.world_size
    dist.all_gather_object(names, mine.name, group=env.checkpoint_group)
    peers = tuple(rank for rank, name in enumerate(names) if (run_dir / name).is_file())
    everyone: list[Any] = [None] * env.world_size
    dist.all_gather_object(everyone, peers, group=env.checkpoint_group)  # every rank has looked: remove the probes
    mine.unlink(missing_ok=True)
    return NodeLocal(env.rank, peers, len(set(everyone)))


def refusal(cfg: Config, launch: Launch) -> str | None:
    """What node-local mode cannot do with this config or launch (each reads local checkpoints every node lacks)."""
    c = cfg.checkpoint
    roles = {"rollback": c.rollback_every, "recovery": c.recovery_every}
    local_only = [f"checkpoint.{role}_every" for role, every in roles.items() if every and role not in c.remote_roles]
    if local_only:
        return f"{local_only[0]} saves a role not in checkpoint.remote_roles (add it there, or set it to 0)"
    if c.best_k:
        return "checkpoint.best_k must be 0 (best-K saves are not uploaded without a shared filesystem yet)"
    if cfg.spike.enabled:
        return "spike.enabled must be false (a rollback reads local checkpoints, which no node holds whole)"
    if launch.rollback_to is not None:
        return "+rollback_to is not supported (resume with +resume=latest or auto: the remote's newest checkpoint)"
    if launch.resume not in (None, "latest", "auto"):
        return "+resume=PATH is not supported (resume with +resume=latest or auto: the remote's newest checkpoint)"
    return None


def refuse(cfg: Config, launch: Launch, run_dir: Path, blind: int) -> None:
    why = refusal(cfg, launch)
    if why is not None:
        raise ConfigError(
            f"run.root: {blind} rank(s) do not see the run directory {run_dir} that rank 0 writes (no shared "
            f"filesystem), and without one: {why}"
        )


def staging_of(run_dir: Path, rank: int, checkpoint: Checkpoint) -> Path:
    """This rank's fresh directory for its files of `checkpoint`, on its own node (a leftover is removed)."""
    staging = RunFiles(run_dir).uploads / str(rank) / checkpoint.relpath
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def remove_leftovers(store: RunDir) -> None:
    """A node leader at start (rank 0's node: rank 0's usual tidying): files of saves a kill cut short."""
    shutil.rmtree(store.files.uploads, ignore_errors=True)
    store.clean_leftovers()


def fetch_share(
    remote: RemoteStore,
    checkpoint: Checkpoint,
    share: list[str],
    staging: Path,
    manifest: Manifest,
    group: dist.ProcessGroup,
) -> None:
    """Every rank: download its `share` of a remote checkpoint's files into `staging`, each checked against the
    manifest; a problem on any rank raises ResumeError on every rank, naming the first."""
    from curry_train.checkpoint.resume import ResumeError  # resume imports the checkpointer, which imports this

    mine = remote.fetch(checkpoint, share, staging, manifest.files) if share else []
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    problems = [p for part in everyone for p in part]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ResumeError(f"checkpoint.remote: {remote.url}/{checkpoint.relpath}: {problems[0]}{more}")


def fetch_everywhere(
    remote: RemoteStore, store: RunDir, env: distributed.Dist, node: NodeLocal, journal: Any
) -> str | None:
    """The remote's newest committed checkpoint into every node's run directory (where it is not committed there
    already): each node's ranks download a share of its files, each checked against the manifest, and the node's
    leader commits it locally. Returns its URL, or None when the remote has none."""
    from curry_train.checkpoint.resume import ResumeError  # resume imports the checkpointer, which imports this

    group = env.checkpoint_group
    newest = distributed.on_rank0(env.is_main, group, _newest, remote)
    if newest is None:
        return None
    checkpoint, manifest, on_remote = newest
    started = time.perf_counter()
    needed = not store.is_committed(checkpoint) if node.leader else False
    wanted: list[Any] = [None] * env.world_size
    dist.all_gather_object(wanted, needed, group=group)
    fetching = wanted[node.peers[0]]
    staging = store.role_dir(checkpoint.role) / f"{TMP_PREFIX}{checkpoint.name}"
    if fetching and node.leader:
        store.staging_dir(checkpoint)
    dist.barrier(group=group)  # the leaders' staging directories exist before their peers write into them
    share = sorted(manifest.files)[node.peers.index(env.rank) :: len(node.peers)] if fetching else []
    fetch_share(remote, checkpoint, share, staging, manifest, group)
    error: Exception | None = None
    if fetching and node.leader:
        try:
            store.commit(checkpoint, staging, extra=manifest.extra, known=manifest.files)
            if manifest.contents is Contents.FULL:
                store.set_latest(checkpoint)
        except Exception as err:  # every rank must hear it
            error = err
    errors: list[Any] = [None] * env.world_size
    dist.all_gather_object(errors, None if error is None else f"rank {env.rank}: {error!r}", group=group)
    if any(errors):
        raise ResumeError(
            f"checkpoint.remote: cannot commit the fetched {checkpoint.relpath} ({next(filter(None, errors))})"
        )
    if node.leader and store.is_committed(checkpoint):
        drop_older_copies(store, checkpoint, on_remote, journal if env.is_main else Deferred())
    nodes = sum(1 for want in wanted if want)
    if nodes == 0:  # every node had it already
        return f"{remote.url}/{checkpoint.relpath}"
    journal.append(
        "remote_fetch",
        checkpoint.step,
        path=checkpoint.relpath,
        bytes=manifest.total_bytes,
        seconds=round(time.perf_counter() - started, 4),
        nodes=nodes,
        reason="node-local mode: every node resumes from the remote's newest committed checkpoint",
    )
    return f"{remote.url}/{checkpoint.relpath}"


def _newest(remote: RemoteStore) -> tuple[Checkpoint, Manifest, list[Checkpoint]] | None:
    newest = remote.latest()
    return None if newest is None else (newest, remote.manifest(newest), remote.list())


def drop_older_copies(store: RunDir, keep: Checkpoint, on_remote: list[Checkpoint], journal: Any) -> None:
    """A node leader: local checkpoints fetched at earlier starts, which the remote still holds, are removed (the
    local disk keeps the one this launch resumes from and the saves waiting for upload)."""
    current = store.latest()
    for checkpoint in store.list():
        if checkpoint in (keep, current) or checkpoint not in on_remote:
            continue
        freed = store.delete(checkpoint)
        journal.append(
            "delete",
            checkpoint.step,
            role=checkpoint.role,
            path=checkpoint.relpath,
            bytes=freed,
            reason="node-local mode: a copy fetched at an earlier start (committed on checkpoint.remote)",
        )


def metadata_problem(staging: Path, reported: set[str]) -> str | None:
    """Rank 0's `.metadata` may reference only files a rank reported writing (the check that rank 0 sees them
    stands aside: they are on other nodes)."""
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(str(staging)).read_metadata().storage_data.values()
    unreported = sorted({info.relative_path for info in storage} - reported)
    if unreported:
        return f"{staging / '.metadata'} references {unreported[0]}, which no rank reported writing"
    return None


def journal_mode(journal: Journal | Deferred, node: NodeLocal) -> None:
    journal.append(
        "node_local",
        0,
        nodes=node.nodes,
        reason="ranks do not see rank 0's run directory: checkpoints are committed on checkpoint.remote only",
    )
