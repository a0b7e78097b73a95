"""A launch's run: taking its directory (one writer: the lock; every rank sees it: the probe), tidying it, choosing
where to resume, refusing a policy that does not fit the disk, and opening its journal and metrics. A refusal
leaves nothing behind."""

from __future__ import annotations

import shutil
import socket
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
import yaml

from curry_train import distributed, failures
from curry_train.checkpoint import node_local, remote_start
from curry_train.checkpoint import resume as resuming
from curry_train.checkpoint.durable import make_durable_dir
from curry_train.checkpoint.node_local import NodeLocal
from curry_train.checkpoint.plan import build_plan, storage_refusal
from curry_train.checkpoint.plan_text import render_plan
from curry_train.checkpoint.resume import ResumePoint
from curry_train.checkpoint.sizes import model_size
from curry_train.checkpoint.store import RunDir, RunLock
from curry_train.config import Config, ConfigError, Launch
from curry_train.distributed import on_rank0
from curry_train.history import end_unfinished_attempt
from curry_train.journal import Deferred, Journal, read_journal
from curry_train.layout import RunFiles
from curry_train.metrics import MetricsLogger
from curry_train.model_shapes import parameter_shapes


@dataclass
class Run:
    """A launch's view of its run directory: where it resumes from, its plan, journal and metrics."""

    dir: Path
    point: ResumePoint | None
    plan: Any
    journal: Journal
    log: MetricsLogger
    lock: RunLock | None  # rank 0's, held until the launch ends
    node: NodeLocal | None = None  # nodes without a shared filesystem: checkpoints committed on the remote only

    def close(self) -> None:
        self.log.close()
        self.journal.close()
        if self.lock is not None:
            self.lock.release()


def open_run(cfg: Config, run_dir: Path, env: distributed.Dist, launch: Launch) -> Run:
    """Take the run directory (one writer), tidy it, decide where to resume and check the storage plan before
    writing anything new, then open journal and metrics. A refusal leaves nothing behind."""
    group = env.checkpoint_group
    config = asdict(cfg)
    store = RunDir(run_dir)
    lock = RunLock(run_dir)
    main = env.is_main
    created = on_rank0(main, group, take_run_dir, run_dir, lock)
    # Opened lazily: a refused start writes nothing to it. What the start finds and tidies is journaled after
    # this launch's run_start.
    files = RunFiles(run_dir)
    journal = Journal(files.journal, enabled=env.is_main)
    found = Deferred()
    try:
        node = (
            open_node_local(cfg, launch, run_dir, env, found)
            if check_shared(run_dir, env, cfg.checkpoint.remote)
            else None
        )
        warnings = on_rank0(main, group, resuming.clean_run_dir, store, found)
        for warning in warnings if env.is_main else []:
            print(f"curry-train: WARNING: {warning}", file=sys.stderr, flush=True)
        fetched = remote_start.start(
            cfg.checkpoint.remote, store, launch, env, found, lease_s=cfg.checkpoint.remote_lease_s, node=node
        )
        point = on_rank0(main, group, resuming.find_resume_point, launch, store, config)
        if point is not None and fetched is not None and fetched.endswith(resuming.relpath_in(store, point.path)):
            point.fetched_from = fetched
        if point is not None and node is not None:
            point.fallbacks = []  # older local copies are rank 0's node's alone
        if point is not None:
            say = (lambda line: print(line, file=sys.stderr, flush=True)) if env.is_main else (lambda line: None)
            point = resuming.choose_verified(point, group, store, found, say)
            on_rank0(main, group, resuming.check_shapes, point.path, parameter_shapes(cfg.model))
        # The plan comes from the config alone: a policy that does not fit the disk refuses to start.
        plan = on_rank0(main, group, build_plan, cfg, model_size(cfg.model), env.world_size, run_dir)
        refusal = storage_refusal(plan)
        if refusal is not None:
            if env.is_main:
                print(render_plan(plan), flush=True)
            raise ConfigError(f"checkpoint.check_storage: {refusal}")
    except Exception:
        if env.is_main and created is not None:  # what this launch created, it removes: a refusal leaves nothing
            lock.release()
            shutil.rmtree(created, ignore_errors=True)
        raise
    if env.is_main:
        files.config.write_text(yaml.safe_dump(config, sort_keys=False))
    attempt = count_launches(journal.path) if env.is_main else 0
    if env.is_main:
        end_unfinished_attempt(journal, run_dir)  # where a killed previous launch stopped, before this run_start
    log = MetricsLogger(
        run_dir,
        cfg.logger,
        cfg.train.steps,
        env.is_main,
        attempt=attempt,
        wandb_config=config,
        run_id=run_dir.name,
    )
    journal.append(
        "run_start",
        point.step if point else 0,
        attempt=attempt,
        world_size=env.world_size,
        num_workers=cfg.data.num_workers,
        resume=launch.resume,
        rollback_to=launch.rollback_to,
        config=config,
    )
    if env.is_main:
        found.replay(journal)
    return Run(run_dir, point, plan, journal, log, lock if env.is_main else None, node)


def take_run_dir(run_dir: Path, lock: RunLock) -> Path | None:
    """Create the run directory if needed and take its lock (rank 0); returns the topmost directory this created
    (None when the run directory existed), which a refused start removes."""
    missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    created = missing[-1] if missing else None
    try:
        make_durable_dir(run_dir)
        holder = lock.acquire()
    except OSError as err:
        raise ConfigError(f"run.root: cannot write the run directory {run_dir} ({failures.one_line(err)})") from None
    if holder is not None:
        raise failures.in_use(run_dir, holder)
    return created


def check_shared(run_dir: Path, env: distributed.Dist, remote: str | None = None) -> int:
    """Every rank must see the run directory rank 0 writes: checkpoints are committed by rank 0 from what the
    others wrote there. A `run.root` on each node's local disk would commit checkpoints without their shards; with
    `checkpoint.remote` the run goes on in node-local mode instead. Returns how many ranks do not see it."""
    if env.world_size == 1:
        return 0
    probe = on_rank0(env.is_main, env.checkpoint_group, write_probe, run_dir)
    seen = (run_dir / probe[0]).is_file() and (run_dir / probe[0]).read_text() == probe[1]
    everyone: list[Any] = [None] * env.world_size
    dist.all_gather_object(everyone, (seen, socket.gethostname()), group=env.checkpoint_group)
    if env.is_main:
        (run_dir / probe[0]).unlink(missing_ok=True)
    blind = [(rank, host) for rank, (ok, host) in enumerate(everyone) if not ok]
    if blind and remote is None:
        rank, host = blind[0]
        raise ConfigError(
            f"run.root: rank {rank} on {host} does not see the run directory {run_dir.absolute()} that rank 0 "
            f"writes ({len(blind)} rank(s) in all): put run.root on a filesystem every node shares, or set "
            "checkpoint.remote (checkpoints are then committed on object storage)"
        )
    return len(blind)


def open_node_local(cfg: Config, launch: Launch, run_dir: Path, env: distributed.Dist, found: Deferred) -> NodeLocal:
    """Some ranks do not see rank 0's run directory and `checkpoint.remote` is set: each node gets a run directory
    of its own (rank 0's keeps journal, metrics and config), said once and journaled."""
    why = node_local.refusal(cfg, launch)
    if why is not None:
        raise ConfigError(f"run.root: not every node sees the run directory {run_dir} (no shared filesystem): {why}")
    node = node_local.probe_nodes(run_dir, env)
    if node.leader and not env.is_main:  # rank 0's node: rank 0's own tidying
        node_local.remove_leftovers(RunDir(run_dir))
    if env.is_main:
        print(
            f"curry-train: node-local mode: {node.nodes} run directories (no shared filesystem); checkpoints are "
            f"committed on {cfg.checkpoint.remote} only",
            file=sys.stderr,
            flush=True,
        )
        node_local.journal_mode(found, node)
    return node


def write_probe(run_dir: Path) -> tuple[str, str]:
    token = uuid.uuid4().hex
    name = f".probe-{token[:8]}"
    (run_dir / name).write_text(token)
    return name, token


def count_launches(journal_path: Path) -> int:
    if not journal_path.exists():
        return 0
    return sum(1 for e in read_journal(journal_path) if e["event"] == "run_start")
