"""Carrying out a resume: tidy the run directory, choose the checkpoint, verify it, load it, check it.

Rank 0 alone reads and changes the run directory; what it decides reaches every rank through
`distributed.on_rank0`, errors included. Rollbacks (`rollback.py`) load through `load` here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from curry_train.checkpoint import io
from curry_train.checkpoint.checkpointer import Checkpointer
from curry_train.checkpoint.commit import journal_save
from curry_train.checkpoint.manifest import MANIFEST, Manifest, check_file
from curry_train.checkpoint.policy import Checkpoint, Role, exact_resume_points
from curry_train.checkpoint.state import (
    PER_RANK_KEYS,
    Contents,
    TrainState,
    digest_algorithm,
    legacy_layout,
)
from curry_train.checkpoint.store import RunDir
from curry_train.config import Launch, flatten
from curry_train.failures import Refused
from curry_train.journal import Deferred, Journal, read_journal
from curry_train.metrics import read_metrics


class ResumeError(RuntimeError):
    """`+resume=...` or `+rollback_to=...` cannot be honoured; the message names the run directory or path."""


@dataclass
class ResumePoint:
    path: Path
    step: int
    contents: Contents
    world_size: int
    rollback_to: str | None = None  # a rollback of this run to its checkpoint at this relpath (one-shot)
    note: str | None = None  # what the launch should tell the user about how this point was chosen
    fallbacks: list[Path] = field(default_factory=list)  # +resume=latest|auto: older full checkpoints, newest first
    fetched_from: str | None = None  # the remote checkpoint this one was downloaded from at this start


# ------------------------------------------------------------------------------------------ where to resume


def _journal_unrecorded_saves(store: RunDir, journal: Journal | Deferred) -> None:
    """A crash between a commit (the rename) and its journal line leaves a committed checkpoint the journal does
    not know: journal it now, so the journal stays the complete record of what is on disk."""
    path = store.files.journal
    if not path.exists():
        return
    newest_save: dict[str, str] = {}
    for event in read_journal(path):
        if event["event"] == "save":
            newest_save[str(event["path"])] = str(event["time"])
    for checkpoint in store.list():
        manifest = store.manifest(checkpoint)
        journaled = newest_save.get(checkpoint.relpath)
        if journaled is None or journaled < manifest.created:
            journal_save(
                journal,
                checkpoint,
                manifest.total_bytes,
                manifest.contents,
                reason="committed before a crash cut its journal line short (recorded at the next start)",
            )


def clean_run_dir(store: RunDir, journal: Journal | Deferred) -> list[str]:
    """At start (rank 0), before the resume point is chosen: finish a rollback a crash cut short, remove what
    interrupted saves left, and point `latest` at the newest full checkpoint if a crash came between a commit and
    the swap of the link."""
    if not store.path.is_dir():
        return []
    warnings = []
    interrupted = store.finish_interrupted_rollback()
    if interrupted is not None:
        target, moved = interrupted
        journal.append(
            "rollback",
            target.step,
            path=target.relpath,
            set_aside=[str(p.relative_to(store.path)) for p in moved],
            reason="finished a rollback that a crash had cut short",
        )
    for path in store.unreadable():
        warnings.append(f"{path} is named like a checkpoint but has no manifest.json: it is never resumed")
        journal.append(
            "error",
            0,
            path=str(path.relative_to(store.path)),
            reason="named like a checkpoint but has no manifest.json (never committed, or damaged): never resumed",
        )
    dangling = store.dangling_latest()
    latest = store.latest()
    for path in store.clean_leftovers():
        journal.append(
            "delete",
            latest.step if latest else 0,
            path=str(path.relative_to(store.path)),
            reason="uncommitted leftover of an interrupted save or delete",
        )
    _journal_unrecorded_saves(store, journal)
    latest, newest = store.latest(), store.newest_full()
    if newest is not None and (latest is None or newest.step > latest.step):
        store.set_latest(newest)
        why = (
            f"`latest` named {dangling}, which is not a committed checkpoint"
            if dangling
            else "the newest full checkpoint was committed but not yet linked"
        )
        journal.append("latest", newest.step, path=newest.relpath, reason=why)
        if dangling:
            warnings.append(f"{why}; it now names {newest.relpath}")
    return warnings


def point_of(path: Path, **fields: Any) -> ResumePoint:
    manifest = Manifest.read(path)
    if manifest.contents is None or manifest.world_size is None:
        raise ValueError(f"{path / MANIFEST} names no contents or world size: it was not written by a save")
    return ResumePoint(path, manifest.step, manifest.contents, manifest.world_size, **fields)


def _own_checkpoint(store: RunDir, path: Path) -> Checkpoint | None:
    """The checkpoint of this run directory that `path` names, if it names one."""
    relpath = relpath_in(store, path)
    return next((c for c in store.list() if c.relpath == relpath), None)


def _rolled_back_before(store: RunDir, relpath: str) -> dict | None:
    """The journal's record of a rollback this run already made to `relpath` by request, if any."""
    journal = store.files.journal
    if not journal.exists():
        return None
    return next(
        (e for e in reversed(read_journal(journal)) if e["event"] == "rollback" and e.get("request") == relpath),
        None,
    )


def find_resume_point(launch: Launch, store: RunDir, config: dict[str, Any] | None = None) -> ResumePoint | None:
    """Where this launch continues from (rank 0 reads the disk, after leftovers were cleaned)."""
    request = launch.rollback_to or launch.resume
    if request is None:
        metrics = store.files.metrics
        if store.list() or (metrics.exists() and metrics.stat().st_size > 0):
            # Not a ResumeError: nobody asked to resume. A refusal that names the two ways on.
            journal = store.files.journal
            finished = journal.exists() and any(e["event"] == "run_end" for e in read_journal(journal))
            raise Refused(
                f"run directory {store.path} already holds a {'finished ' if finished else ''}run "
                f"({describe_run(store, config)}) and this launch has no +resume: continue it with +resume=latest "
                "(or +resume=auto), or start another beside it with run.id=NAME"
            )
        return None
    if request in ("latest", "auto") and launch.rollback_to is None:
        return _latest_point(store, request)
    path = Path(request).expanduser()
    try:
        own = _own_checkpoint(store, path)
        latest = store.latest()
        if launch.rollback_to is not None and own is None:
            raise ResumeError(
                f"+rollback_to={request}: not a committed checkpoint of this run ({store.path}); to start from "
                "another run's checkpoint use +resume=PATH"
            )
        # Resuming this run from a checkpoint older than `latest` abandons the steps after it: a rollback.
        if own is not None and (launch.rollback_to is not None or (latest is not None and own.step < latest.step)):
            done = _rolled_back_before(store, own.relpath)
            if done is not None:  # a requeue of the command that rolled back: go on from where the run is now
                point = _latest_point(store, "latest")
                assert point is not None
                point.note = (
                    f"this run already rolled back to {own.relpath} at {done['time']} (see its journal); "
                    f"continuing from latest, step {point.step}"
                )
                return point
            return point_of(path, rollback_to=own.relpath)
        return point_of(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ResumeError(
            f"+{'rollback_to' if launch.rollback_to else 'resume'}={request}: {path} is not a committed "
            f"curry-train checkpoint ({type(err).__name__}: {err})"
        ) from None


def describe_run(store: RunDir, config: dict[str, Any] | None) -> str:
    """What a run directory holds, in a few words: steps done, when it was last launched, how its config differs."""
    import yaml

    words = []
    metrics = store.files.metrics
    if metrics.exists():
        words.append(f"{max(read_metrics(metrics), default=0)} steps done")
    journal = store.files.journal
    if journal.exists():
        starts = [e for e in read_journal(journal) if e["event"] == "run_start"]
        if starts:
            words.append(f"last launched {str(starts[-1]['time'])[:16].replace('T', ' ')}")
    saved = store.files.config
    if config is not None and saved.exists():
        before, now = flatten(yaml.safe_load(saved.read_text()) or {}), flatten(config)
        changed = [
            f"{k}={before.get(k)!r} there, {now.get(k)!r} here"
            for k in sorted(set(before) | set(now))
            if before.get(k) != now.get(k)
        ]
        if changed:
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            words.append("config differs: " + "; ".join(changed[:3]) + more)
        else:
            words.append("the same config")
    return ", ".join(words) or "checkpoints"


def _latest_point(store: RunDir, request: str) -> ResumePoint | None:
    # `latest` names the newest checkpoint of the current trajectory (full state, or after a parameters-only
    # rollback the checkpoint rolled back to); the start has already repaired it after a crash.
    latest = store.latest() or store.newest_full()
    if latest is None:
        if request == "auto":
            return None
        raise ResumeError(
            f"+resume=latest: run directory {store.path} has no committed checkpoint with full state to resume "
            "from; start without +resume, or use +resume=auto to start fresh when there is none"
        )
    older = [c for c in store.list() if c.role is not Role.BEST_K and c.step <= latest.step and c != latest]
    full = exact_resume_points(older, lambda c: store.manifest(c).contents is Contents.FULL)
    return point_of(store.path_of(latest), fallbacks=[store.path_of(c) for c in full])


# -------------------------------------------------------------------------------------------- verification


def verify_everywhere(path: Path, group: dist.ProcessGroup) -> list[str]:
    """Check a checkpoint's files against its manifest before loading it: sizes and checksums, each rank a share of
    the files (so a large checkpoint is read in parallel), every rank gets every problem."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    try:
        manifest = Manifest.read(path)
        names = sorted(manifest.files)
        mine = [problem for rel in names[rank::world] if (problem := check_file(path, rel, manifest.files[rel]))]
    except (OSError, ValueError, KeyError, TypeError) as err:
        mine = [f"{MANIFEST}: unreadable ({type(err).__name__}: {err})"]
    gathered: list[list[str]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, mine, group=group)
    return sorted({problem for part in gathered for problem in part})


def choose_verified(
    point: ResumePoint,
    ckpt_group: dist.ProcessGroup,
    store: RunDir,
    journal: Journal | Deferred,
    tell_user: Callable[[str], None],
) -> ResumePoint:
    """The first of `point` and its fallbacks whose files match their manifest. A damaged checkpoint named by
    +resume=PATH (no fallbacks) is an error; +resume=latest falls back, with a warning and a journal line."""
    candidates = [point.path, *point.fallbacks]
    for number, path in enumerate(candidates):
        problems = verify_everywhere(path, ckpt_group)
        if not problems:
            chosen = point if number == 0 else point_of(path)
            return chosen
        relpath = relpath_in(store, path)
        where = f"{relpath}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        if not point.fallbacks or point.rollback_to is not None:
            raise ResumeError(f"checkpoint {where}; run `curry-train verify {store.path}` to see every problem")
        following = relpath_in(store, candidates[number + 1]) if number + 1 < len(candidates) else None
        tell_user(f"curry-train: WARNING: checkpoint {where}; " + (f"falling back to {following}" if following else ""))
        journal.append(
            "resume_fallback",
            int(Manifest.read(path).step) if (path / MANIFEST).is_file() else 0,
            path=relpath,
            problems=problems[:10],
            fallback=following,
        )
    raise ResumeError(
        f"no checkpoint of {store.path} passed verification (every full checkpoint has damaged files); run "
        f"`curry-train verify {store.path}`"
    )


def check_shapes(path: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Before loading: the checkpoint's parameters have the shapes of this model (read from DCP's metadata, no
    tensor loaded), or one line naming the first tensor that differs and both shapes."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved = {
        key.removeprefix("model."): tuple(meta.size)
        for key, meta in metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    for name, shape in expected.items():
        if name not in saved:
            raise ResumeError(f"checkpoint {path} has no tensor {name} that this model has: it is another model")
        if saved[name] != shape:
            raise ResumeError(
                f"checkpoint {path} does not fit this model: {name} is {list(saved[name])} in the checkpoint and "
                f"{list(shape)} here; resume with the model config the checkpoint was trained with"
            )
    extra = sorted(set(saved) - set(expected))
    if extra:
        raise ResumeError(f"checkpoint {path} has tensors this model lacks ({extra[0]}, ...): it is another model")


# ------------------------------------------------------------------------------------------------- loading


def load(point: ResumePoint, checkpointer: Checkpointer, train_state: TrainState, world_size: int) -> None:
    """Load the checkpoint at `point` (all ranks); after a full checkpoint on the same world size, check that
    parameters, RNG and the next batch are bitwise what was saved."""
    same_world = point.world_size == world_size
    wanted = train_state.state(point.contents)
    if not same_world:
        # Per-rank states belong to the old layout of ranks; the data position is the global sample cursor.
        for key in PER_RANK_KEYS:
            wanted.pop(key, None)
    if "dataloader" not in io.saved_keys(point.path):
        wanted = legacy_layout(wanted)  # written before `dataloader`: the data position is in `progress`
    train_state.saved_fidelity.clear()
    io.load(wanted, point.path, checkpointer.group)
    if point.contents is Contents.PARAMS:
        train_state.optimizer.state.clear()  # Adam's moments start fresh (a rollback may have had them)
    train_state.progress.world_size = world_size
    if point.contents is Contents.FULL and same_world:
        check_fidelity(
            train_state.saved_fidelity, train_state.fidelity_now(digest_algorithm(train_state.saved_fidelity))
        )


def relpath_in(store: RunDir, path: Path) -> str:
    try:
        return path.resolve().relative_to(store.path.resolve()).as_posix()
    except ValueError:  # a checkpoint of another run directory
        return str(path)


def resume(
    point: ResumePoint,
    checkpointer: Checkpointer,
    train_state: TrainState,
    world_size: int,
    tell_user: Callable[[str], None],
) -> None:
    """Continue from `point` at launch: load it and journal the resume."""
    load(point, checkpointer, train_state, world_size)
    same_world = point.world_size == world_size
    relpath = relpath_in(checkpointer.store, point.path)
    checkpointer.journal.append(
        "resume",
        point.step,
        path=relpath,
        contents=point.contents,
        exact=point.contents is Contents.FULL and same_world,
        world_size=world_size,
        saved_world_size=point.world_size,
        **({"source": "remote", "remote": point.fetched_from} if point.fetched_from else {}),
    )
    if not same_world:
        checkpointer.journal.append("world_size_change", point.step, old=point.world_size, new=world_size)
    tell_user(
        f"curry-train: resumed from step {point.step} of {relpath}"
        + (f" (fetched from {point.fetched_from})" if point.fetched_from else "")
        + ("" if same_world else f" (world size {point.world_size} -> {world_size})")
        + ("" if point.contents is Contents.FULL else " (parameters only: optimizer state starts fresh)")
    )


def check_fidelity(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """After a resume on the same world size: parameters and RNG must be bitwise what was saved."""
    for key in ("params", "rng"):
        if key in saved and saved[key] != now[key]:
            raise ResumeError(
                f"resume fidelity check failed: the {key} digest after loading is {now[key]}, "
                f"the checkpoint recorded {saved[key]}; the checkpoint or the code that loads it is "
                "not what saved it"
            )
    if "next_indices" in saved and saved["next_indices"] != now["next_indices"]:
        raise ResumeError(
            f"resume fidelity check failed: the next batch would be samples {now['next_indices'][:4]}..., "
            f"the checkpoint recorded {saved['next_indices'][:4]}..."
        )


def check_next_batch(batches: Iterator[dict], expected: list[int]) -> Iterator[dict]:
    """The first batch after a resume must be the one the global sample cursor names; it is then passed on."""
    first = next(batches)
    got = first["index"].tolist()
    if got != expected:
        raise ResumeError(
            f"resume fidelity check failed: the data loader resumed at samples {got[:4]}..., "
            f"the step's cursor names {expected[:4]}..."
        )
    return itertools.chain([first], batches)
