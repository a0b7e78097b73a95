"""Carrying out a resume or a rollback: choose the checkpoint, load it, check it, rewind the run directory.

The decisions are pure functions in `policy.py` (target, what to set aside, which samples to skip) and in
`curry_train/spike.py` (is this a spike, how many rollbacks recently); this module applies them to the model, the
optimizer, the progress counters and the run directory. Rank 0 alone reads and changes the run directory; what it
decides reaches every rank through `agree`, errors included.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from curry_train.checkpoint.checkpointer import Checkpointer
from curry_train.checkpoint.policy import Checkpoint, Role, abandoned_by_rollback, rollback_target, skipped_range
from curry_train.checkpoint.state import PER_RANK_KEYS, Contents, Progress
from curry_train.checkpoint.store import MANIFEST, Manifest, RunDir, check_file
from curry_train.config import Launch, SpikeConfig
from curry_train.journal import Journal, read_journal
from curry_train.metrics import read_metrics
from curry_train.spike import SpikeRule, Verdict, recent_rollbacks, rollback_bound


class ResumeError(RuntimeError):
    """`+resume=...` or `+rollback_to=...` cannot be honoured; the message names the run directory or path."""


class SpikeError(RuntimeError):
    """A loss spike the run cannot roll back from (no checkpoint early enough, or too many rollbacks): exit 3."""


@dataclass
class ResumePoint:
    path: Path
    step: int
    contents: Contents
    world_size: int
    rollback_to: str | None = None  # a rollback of this run to its checkpoint at this relpath (one-shot)
    note: str | None = None  # what the launch should tell the user about how this point was chosen
    fallbacks: list[Path] = field(default_factory=list)  # +resume=latest|auto: older full checkpoints, newest first


@dataclass
class Trainee:
    """What a resume or a rollback loads into."""

    state: Callable[[Contents], dict]  # the DCP state of a checkpoint with these contents
    optimizer: torch.optim.Optimizer
    progress: Progress
    saved_fidelity: dict[str, Any]  # filled by loading a full checkpoint
    fidelity_now: Callable[[], dict[str, Any]]


# ------------------------------------------------------------------------------------------ where to resume


def _journal_unrecorded_saves(store: RunDir, journal: Journal) -> None:
    """A crash between a commit (the rename) and its journal line leaves a committed checkpoint the journal does
    not know: journal it now, so the journal stays the complete record of what is on disk."""
    if not journal.path.exists():
        return
    newest_save: dict[str, str] = {}
    for event in read_journal(journal.path):
        if event["event"] == "save":
            newest_save[str(event["path"])] = str(event["time"])
    for ckpt in store.list():
        manifest = store.manifest(ckpt)
        journaled = newest_save.get(ckpt.relpath)
        if journaled is None or journaled < manifest.created:
            journal.append(
                "save",
                ckpt.step,
                role=ckpt.role,
                path=ckpt.relpath,
                bytes=manifest.total_bytes,
                contents=manifest.extra.get("contents"),
                reason="committed before a crash cut its journal line short (recorded at the next start)",
            )



def clean_run_dir(store: RunDir, journal: Journal) -> list[str]:
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


def _point(path: Path, **fields: Any) -> ResumePoint:
    manifest = Manifest.read(path)
    return ResumePoint(
        path, manifest.step, Contents(manifest.extra["contents"]), int(manifest.extra["world_size"]), **fields
    )


def _own_checkpoint(store: RunDir, path: Path) -> Checkpoint | None:
    """The checkpoint of this run directory that `path` names, if it names one."""
    try:
        relpath = path.resolve().relative_to(store.path.resolve()).as_posix()
    except ValueError:
        return None
    return next((c for c in store.list() if c.relpath == relpath), None)


def _rolled_back_before(store: RunDir, relpath: str) -> dict | None:
    """The journal's record of a rollback this run already made to `relpath` by request, if any."""
    journal = store.path / "journal.jsonl"
    if not journal.exists():
        return None
    return next(
        (e for e in reversed(read_journal(journal)) if e["event"] == "rollback" and e.get("request") == relpath),
        None,
    )


def find_resume_point(launch: Launch, store: RunDir) -> ResumePoint | None:
    """Where this launch continues from (rank 0 reads the disk, after leftovers were cleaned)."""
    request = launch.rollback_to or launch.resume
    if request is None:
        metrics = store.path / "metrics.jsonl"
        if store.list() or (metrics.exists() and metrics.stat().st_size > 0):
            raise ResumeError(
                f"run directory {store.path} already holds a run; continue it with +resume=latest "
                "(or +resume=auto), or start a new one with run.id=NAME"
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
            return _point(path, rollback_to=own.relpath)
        return _point(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ResumeError(
            f"+{'rollback_to' if launch.rollback_to else 'resume'}={request}: {path} is not a committed "
            f"curry-train checkpoint ({type(err).__name__}: {err})"
        ) from None


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
    full = [c for c in older if store.manifest(c).extra.get("contents") == Contents.FULL.value]
    full.sort(key=lambda c: (c.step, c.role is Role.RECOVERY), reverse=True)
    return _point(store.path_of(latest), fallbacks=[store.path_of(c) for c in full])


# -------------------------------------------------------------------------------------------- verification


def verify_everywhere(path: Path, group: dist.ProcessGroup) -> list[str]:
    """Check a checkpoint's files against its manifest before loading it: sizes and crc32, each rank a share of
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
    point: ResumePoint, ckpt_group: dist.ProcessGroup, store: RunDir, journal: Journal, say: Callable[[str], None]
) -> ResumePoint:
    """The first of `point` and its fallbacks whose files match their manifest. A damaged checkpoint named by
    +resume=PATH (no fallbacks) is an error; +resume=latest falls back, with a warning and a journal line."""
    candidates = [point.path, *point.fallbacks]
    for number, path in enumerate(candidates):
        problems = verify_everywhere(path, ckpt_group)
        if not problems:
            chosen = point if number == 0 else _point(path)
            return chosen
        relpath = relpath_in(store, path)
        where = f"{relpath}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        if not point.fallbacks or point.rollback_to is not None:
            raise ResumeError(f"checkpoint {where}; run `curry-train verify {store.path}` to see every problem")
        following = relpath_in(store, candidates[number + 1]) if number + 1 < len(candidates) else None
        say(f"curry-train: WARNING: checkpoint {where}; " + (f"falling back to {following}" if following else ""))
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


def load(point: ResumePoint, ckpt: Checkpointer, into: Trainee, world_size: int) -> None:
    """Load the checkpoint at `point` (all ranks); after a full checkpoint on the same world size, check that
    parameters, RNG and the next batch are bitwise what was saved."""
    same_world = point.world_size == world_size
    wanted = into.state(point.contents)
    if not same_world:
        # Per-rank states belong to the old layout of ranks; the data position is the global sample cursor.
        for key in PER_RANK_KEYS:
            wanted.pop(key, None)
    into.saved_fidelity.clear()
    ckpt.load(point.path, wanted)
    if point.contents is Contents.PARAMS:
        into.optimizer.state.clear()  # Adam's moments start fresh (a rollback may have had them)
    into.progress.world_size = world_size
    if point.contents is Contents.FULL and same_world:
        check_fidelity(into.saved_fidelity, into.fidelity_now())


def relpath_in(store: RunDir, path: Path) -> str:
    try:
        return path.resolve().relative_to(store.path.resolve()).as_posix()
    except ValueError:  # a checkpoint of another run directory
        return str(path)


def resume(point: ResumePoint, ckpt: Checkpointer, into: Trainee, world_size: int, say: Callable[[str], None]) -> None:
    """Continue from `point` at launch: load it and journal the resume."""
    load(point, ckpt, into, world_size)
    same_world = point.world_size == world_size
    relpath = relpath_in(ckpt.store, point.path)
    ckpt.journal.append(
        "resume",
        point.step,
        path=relpath,
        contents=point.contents,
        exact=point.contents is Contents.FULL and same_world,
        world_size=world_size,
        saved_world_size=point.world_size,
    )
    if not same_world:
        ckpt.journal.append("world_size_change", point.step, old=point.world_size, new=world_size)
    say(
        f"curry-train: resumed from step {point.step} of {relpath}"
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


# ------------------------------------------------------------------------------------------------ rollback


def agree(value: Any, group: dist.ProcessGroup) -> Any:
    """Rank 0's value (or the exception it raised), on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def on_rank0(ckpt: Checkpointer, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` run by rank 0 alone; its result, or the exception it raised, on every rank."""
    if not ckpt.is_main:
        return agree(None, ckpt.group)
    try:
        value = fn(*args)
    except Exception as err:
        value = err
    return agree(value, ckpt.group)


@dataclass(frozen=True)
class Cause:
    """Why a run rolls back: where the abandoned trajectory reached, and what was seen there."""

    step: int  # the abandoned trajectory's last completed step (the spike step)
    cursor: int  # the global sample cursor after that step
    fields: dict[str, Any]  # journaled as they are (loss, baseline, threshold, request, ...)
    summary: str  # said on the console


def roll_back(
    point: ResumePoint,
    cause: Cause,
    ckpt: Checkpointer,
    into: Trainee,
    spike: SpikeConfig,
    batch_size: int,
    world_size: int,
    say: Callable[[str], None],
) -> None:
    """Return this run to the checkpoint at `point`, skip the abandoned steps' samples, and make that durable.

    The same for an automatic rollback (a spike seen in process) and a manual one (`+rollback_to`). Afterwards the
    abandoned rollback and recovery checkpoints are set aside (crash-safely, newest first, then `latest` moves),
    and the target step is saved again with the new data position, so a crash from here resumes the new trajectory.
    """
    ckpt.wait()
    history, injected = list(into.progress.rollbacks), list(into.progress.injected)
    load(point, ckpt, into, world_size)
    progress = into.progress
    start, end = skipped_range(progress.cursor, cause.cursor, spike.skip_extra_steps, batch_size)
    if end > start:
        progress.skipped = [*progress.skipped, [start, end]]
    progress.cursor = end
    # The run's history is not rewound: what this process saw, and what the checkpoint recorded (at launch, the
    # process has seen nothing yet).
    progress.rollbacks = [*_union(history, progress.rollbacks), {"spike_step": cause.step, "step": point.step}]
    progress.injected = _union(injected, progress.injected)
    fresh_optimizer = point.contents is Contents.PARAMS
    if fresh_optimizer:
        progress.rewarm_from = point.step
    assert point.rollback_to is not None
    target = RunDir.parse_relpath(point.rollback_to)
    assert target is not None

    def rewind_run_dir() -> tuple[list[str], list[Role]]:
        committed = ckpt.store.list()
        moved = ckpt.store.roll_back(target, abandoned_by_rollback(committed, point.step))
        ckpt.journal.append(
            "rollback",
            point.step,
            path=point.rollback_to,
            spike_step=cause.step,
            skipped=[[start, end]] if end > start else [],
            skipped_steps=cause.step - point.step + spike.skip_extra_steps,
            optimizer_restored=not fresh_optimizer,
            rewarmup_steps=spike.rewarmup_steps if fresh_optimizer else 0,
            set_aside=[str(p.relative_to(ckpt.store.path)) for p in moved],
            **cause.fields,
        )
        return [str(p.relative_to(ckpt.store.path)) for p in moved], [
            c.role for c in committed if c.step == point.step and c.role is not Role.BEST_K
        ]

    set_aside, roles = on_rank0(ckpt, rewind_run_dir)
    # The target step again, now with the skipped range in its progress: a crash from here on resumes the new
    # trajectory exactly, never the spiked one. It replaces the old bytes through the store's atomic re-save.
    ckpt.save(point.step, roles, point.contents, into.state(point.contents))
    ckpt.wait()
    say(
        f"curry-train: {cause.summary}: rolled back to step {point.step} ({point.rollback_to}), skipping samples "
        f"[{start}, {end}) ({(end - start) // batch_size} steps of data); "
        + (
            f"optimizer state starts fresh, lr re-warms over {spike.rewarmup_steps} steps"
            if fresh_optimizer
            else "optimizer state restored"
        )
        + f"; {len(set_aside)} newer checkpoint(s) set aside"
    )


def spike_rollback_point(
    verdict: Verdict, step: int, progress: Progress, ckpt: Checkpointer, spike: SpikeConfig, batch_size: int
) -> tuple[ResumePoint, Cause]:
    """Where an in-process rollback after a spike at `step` goes, or a SpikeError when it cannot."""
    rule = SpikeRule(spike.window, spike.warmup_steps, spike.sigmas, spike.min_rise)
    seen = [r["spike_step"] for r in progress.rollbacks]
    if recent_rollbacks(seen, step, spike.max_rollbacks_within) >= spike.max_rollbacks:
        raise SpikeError(
            f"{verdict.reason}; this run already rolled back {spike.max_rollbacks} time(s) within the last "
            f"{spike.max_rollbacks_within} steps (spike.max_rollbacks): stopping with every checkpoint intact. Look at "
            "the data and the lr around these steps; raise spike.max_rollbacks to allow more"
        )
    bound = rollback_bound(step, rule, spike.rollback_margin)

    def choose() -> ResumePoint | None:
        target = rollback_target(ckpt.store.list(), bound)
        return None if target is None else _point(ckpt.store.path_of(target), rollback_to=target.relpath)

    point = on_rank0(ckpt, choose)
    if point is None:
        raise SpikeError(
            f"{verdict.reason}; no rollback or recovery checkpoint at or before step {bound} (the spike step less "
            f"spike.window={spike.window} and spike.rollback_margin={spike.rollback_margin}) to roll back to: "
            "stopping with every checkpoint intact"
        )
    injected = any(point.step < s <= step for s in progress.injected)
    fields = {
        "loss": verdict.loss,
        "baseline": verdict.baseline,
        "threshold": verdict.threshold,
        "reason": verdict.reason,
        "injected": injected,
    }
    how = " (injected by +debug.inject_spike_at)" if injected else ""
    summary = f"loss spike at step {step}{how}: {verdict.reason}"
    return point, Cause(step, progress.cursor + batch_size, fields, summary)


def manual_rollback_cause(point: ResumePoint, store: RunDir, batch_size: int) -> Cause:
    """A `+rollback_to`: the abandoned trajectory reached the last step in metrics.jsonl (rank 0 reads)."""
    metrics = store.path / "metrics.jsonl"
    reached = point.step
    if metrics.exists():
        reached = max(point.step, _last_logged_step(metrics))
    # The cursor there: from the newest checkpoint at or before it (its manifest records the cursor), plus a batch
    # a step; the steps after a checkpoint skip nothing (a skip happens only at a rollback, which saves).
    trajectory = [c for c in store.list() if c.role is not Role.BEST_K and c.step <= reached]
    base = max(trajectory, key=lambda c: c.step, default=None)
    base_step, base_cursor = 0, 0
    if base is not None:
        extra = store.manifest(base).extra
        base_step, base_cursor = base.step, int(extra.get("cursor", base.step * batch_size))
    cursor = base_cursor + (reached - base_step) * batch_size
    fields = {"request": point.rollback_to, "reason": f"+rollback_to={point.rollback_to}"}
    return Cause(reached, cursor, fields, f"rollback requested (the run had reached step {reached})")


def _last_logged_step(metrics: Path) -> int:
    steps = read_metrics(metrics)
    if not steps:
        return 0
    # The line written last is where the current trajectory stopped (earlier trajectories may have gone further).
    return max(steps.values(), key=lambda r: (r.get("time", 0), r["step"]))["step"]


def _union(first: list, second: list) -> list:
    return first + [x for x in second if x not in first]
