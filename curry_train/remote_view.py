"""`curry-train ls`, `status`, `verify` and `export` given a run on the remote instead of a run directory: a URL
`<checkpoint.remote>/<run-id>` (`s3://bucket/prefix/RUN_ID`; for `export` also a checkpoint under it,
`.../RUN_ID/recovery/step-00001000.dcp`). Any argument with `://` is read as one. Credentials come from the
environment as for training; nothing here prints them (errors go through `remote.describe_error`).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import yaml

from curry_train.checkpoint.lease import Holder
from curry_train.checkpoint.lease_store import LEASE
from curry_train.checkpoint.manifest import MANIFEST
from curry_train.checkpoint.policy import Checkpoint, Role, parse_checkpoint_name
from curry_train.checkpoint.remote import RemoteError, RemoteStore, describe_error
from curry_train.layout import CONFIG, JOURNAL, METRICS
from curry_train.units import human_bytes


def is_remote(arg: str) -> bool:
    return "://" in arg


def _checkpoint_of(url: str) -> tuple[str, Checkpoint | None]:
    """(run URL, checkpoint) for a URL that names a checkpoint under a run; (url, None) for a run's URL."""
    parts = PurePosixPath(url.split("://", 1)[1].rstrip("/")).parts
    if len(parts) >= 3:
        for role in Role:
            if parts[-2] == role.dirname and (checkpoint := parse_checkpoint_name(role, parts[-1])) is not None:
                return url.rstrip("/").rsplit("/", 2)[0], checkpoint
    return url.rstrip("/"), None


def open_run(url: str) -> RemoteStore:
    """The run at `url`, or RemoteError when the store cannot be read or holds no run there."""
    remote = RemoteStore.of_run(url)
    try:
        remote.fs.invalidate_cache(remote.root)
        found = remote.fs.exists(remote.root)
    except Exception as err:
        raise RemoteError(f"cannot read {remote.url} ({describe_error(remote.url, err)})") from None
    if not found:
        raise RemoteError(f"{remote.url}: no run there (nothing under that prefix)")
    return remote


def ls_lines(remote: RemoteStore) -> list[str]:
    """Committed checkpoints with their size and which one `latest` names; then uncommitted leftovers."""
    latest = remote.latest()
    lines = [f"{remote.url}: committed checkpoints on the remote"]
    for checkpoint in remote.list():
        manifest = remote.manifest(checkpoint)
        mark = "  <- latest" if checkpoint == latest else ""
        contents = manifest.contents or "?"
        size = human_bytes(manifest.total_bytes)
        lines.append(f"{checkpoint.relpath:<52} step {checkpoint.step:>8}  {contents:<6}  {size:>9}{mark}")
    if len(lines) == 1:
        lines.append("  none")
    for relpath in remote.uncommitted():
        lines.append(
            f"{relpath}: no {MANIFEST}: an upload or deletion cut short, never resumed (the next start removes it)"
        )
    return lines


def verify_lines(remote: RemoteStore) -> tuple[list[str], int]:
    """Every committed remote checkpoint's files against its manifest (sizes and checksums, read as streams)."""
    lines, bad = [], 0
    for checkpoint in remote.list():
        problems = remote.check(checkpoint, remote.manifest(checkpoint))
        bad += bool(problems)
        lines.append(f"{checkpoint.relpath}: " + ("ok" if not problems else "; ".join(problems)))
    for relpath in remote.uncommitted():
        bad += 1
        lines.append(f"{relpath}: no {MANIFEST}: never committed; never resumed")
    return lines, bad


def lease_line(remote: RemoteStore) -> str:
    body = remote.read_bytes(LEASE)
    holder = Holder.from_bytes(body) if body is not None else None
    if holder is None:
        return "lease: none (no launch has taken it)"
    if holder.released:
        return f"lease: released by its last holder ({holder.describe(time.time())})"
    now = time.time()
    state = "expired" if now - holder.renewed > holder.lease_s else "held"
    return f"lease: {state} ({holder.describe(now)}; checkpoint.remote_lease_s={holder.lease_s:g})"


@contextmanager
def run_copy(remote: RemoteStore) -> Iterator[Path | None]:
    """The run's journal, metrics and config downloaded into a temporary run directory named after the run, when
    the run uploads its journal; None when it does not."""
    journal = remote.read_bytes(JOURNAL)
    if journal is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="curry-train-remote-") as tmp:
        run_dir = Path(tmp) / remote.url.rsplit("/", 1)[1]
        run_dir.mkdir()
        (run_dir / JOURNAL).write_bytes(journal)
        for name in (METRICS, CONFIG):
            if (body := remote.read_bytes(name)) is not None:
                (run_dir / name).write_bytes(body)
        yield run_dir


def status_lines(remote: RemoteStore) -> list[str]:
    """What the remote holds: the run's history from its uploaded journal when there is one, its checkpoints, the
    newest against `latest`, uncommitted leftovers and the lease."""
    from curry_train.history import read_run
    from curry_train.history_text import headline, history_lines

    lines = []
    with run_copy(remote) as run_dir:
        if run_dir is not None:
            run = read_run(run_dir)
            lines += [f"{run.name}: {headline(run)}", "history (the journal on the remote):"]
            lines += [f"  {line}" for line in history_lines(run)]
        else:
            lines.append(f"{remote.url}: no {JOURNAL} on the remote (this run does not upload it): checkpoints only")
    committed = remote.list()
    latest = remote.latest()
    newest = max(committed, key=lambda c: c.step, default=None)
    total = sum(remote.manifest(c).total_bytes for c in committed)
    lines.append(
        f"remote: {len(committed)} committed checkpoint(s), {human_bytes(total)}; latest -> "
        f"{latest.relpath if latest else 'none'}" + (f"; newest step {newest.step}" if newest else "")
    )
    leftovers = remote.uncommitted()
    if leftovers:
        lines.append(f"remote: {len(leftovers)} uncommitted leftover(s) (the next start removes them)")
    lines.append(lease_line(remote))
    return lines


def choose(remote: RemoteStore, checkpoint: Checkpoint | None) -> Checkpoint:
    """The checkpoint `export` takes: the one named; else the run's best best-K (by the uploaded config's
    direction, minimize without one), else `latest`."""
    committed = remote.list()
    if checkpoint is not None:
        if checkpoint not in committed:
            raise RemoteError(f"{remote.url}/{checkpoint.relpath}: not a committed checkpoint (no {MANIFEST})")
        return checkpoint
    best = [c for c in committed if c.role is Role.BEST_K and c.metric is not None]
    if best:
        config = yaml.safe_load(remote.read_bytes(CONFIG) or b"{}") or {}
        maximize = (config.get("checkpoint") or {}).get("best_k_direction") == "maximize"
        return min(best, key=lambda c: ((-1.0 if maximize else 1.0) * c.metric, c.step))
    latest = remote.latest()
    if latest is None:
        raise RemoteError(f"{remote.url}: no committed checkpoint to export")
    return latest


@contextmanager
def fetched(url: str) -> Iterator[tuple[Path, Path | None, str]]:
    """Download the checkpoint `export` takes from the run or checkpoint at `url` into a temporary run directory,
    each file checked against the manifest; yields (checkpoint directory, the run's config.yaml if uploaded, the
    checkpoint's URL)."""
    run_url, named = _checkpoint_of(url)
    remote = open_run(run_url)
    checkpoint = choose(remote, named)
    manifest = remote.manifest(checkpoint)
    with tempfile.TemporaryDirectory(prefix="curry-train-export-") as tmp:
        run_dir = Path(tmp) / remote.url.rsplit("/", 1)[1]
        local = run_dir / checkpoint.relpath
        problems = remote.fetch(checkpoint, sorted(manifest.files), local, manifest.files)
        if problems:
            raise RemoteError(f"{remote.url}/{checkpoint.relpath}: {problems[0]}")
        remote.fs.get_file(remote.key(f"{checkpoint.relpath}/{MANIFEST}"), str(local / MANIFEST))
        config = remote.read_bytes(CONFIG)
        if config is not None:
            (run_dir / CONFIG).write_bytes(config)
        yield local, (run_dir / CONFIG) if config is not None else None, f"{remote.url}/{checkpoint.relpath}"
