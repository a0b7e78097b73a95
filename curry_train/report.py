"""Text for `curry-train status` and `curry-train diff`: a run's facts first, details after."""

from __future__ import annotations

from typing import Any

from curry_train.checkpoint.store import RunDir
from curry_train.config import flatten
from curry_train.history import RunHistory
from curry_train.history_text import headline, history_lines, in_words, plural
from curry_train.units import human_bytes

# Metrics compared by `diff` besides the train loss, when both runs have them at common steps.
COMPARED_METRICS = ("loss", "dev_loss", "lr", "grad_norm")


def _progress(run: RunHistory) -> str:
    last = run.attempts[-1] if run.attempts else None
    done = last.last_step if last is not None else None
    total = run.total_steps
    end = last.end if last is not None else None
    if end is None:
        state = "no end journaled yet: running, or killed" if last is not None else "never launched"
    elif end["event"] == "run_end":
        state = "finished"
    elif end["event"] == "preempt" and end.get("forced"):
        state = f"stopped by a second {end.get('signal', 'signal')}; continue with +resume=latest"
    elif end["event"] == "preempt":
        state = "preempted; continue with +resume=latest"
    else:
        state = "stopped; continue with +resume=latest"
    return f"{done if done is not None else 0} of {total if total is not None else '?'} steps done ({state})"


def storage_line(run: RunHistory) -> str:
    """Bytes in use against what the run's plan commits (its last `policy` event)."""
    store = RunDir(run.path)
    used = store.disk_usage()
    text = f"storage: {human_bytes(used)} in {len(store.list())} committed checkpoints (hard links counted once)"
    aside = store.abandoned()  # the listing leaves them out; `ls` and `gc` count them the same way
    if aside:
        text += f", plus {human_bytes(sum(a.nbytes for a in aside))} in {len(aside)} set aside by rollbacks"
    policy = next((e for e in reversed(run.events) if e["event"] == "policy"), None)
    committed = policy.get("committed_bytes") if policy else None
    if isinstance(committed, (int, float)) and committed > 0:
        text += f"; the plan commits {human_bytes(committed)} ({used / committed:.0%} in use)"
    return text


def remote_line(run: RunHistory, latest_step: int | None) -> str | None:
    """What the journal says is on checkpoint.remote and how far it lags the run directory's `latest` (read from the
    journal, so `status` never needs the store's credentials)."""
    starts = [e for e in run.events if e["event"] == "run_start"]
    url = ((starts[-1].get("config") or {}).get("checkpoint") or {}).get("remote") if starts else None
    if not url:
        return None
    uploads = [e for e in run.events if e["event"] == "upload"]
    newest = max(uploads, key=lambda e: int(e["step"]), default=None)
    text = f"remote: {url.rstrip('/')}/{run.path.name}: "
    if newest is None:
        text += "nothing uploaded yet"
    else:
        text += f"newest upload {newest['path']} (step {newest['step']}, {human_bytes(newest['bytes'])})"
        if latest_step is not None:
            lag = latest_step - int(newest["step"])
            text += f", {lag} step(s) behind latest" if lag > 0 else ", up to date with latest"
    counts = [
        (n, kind) for kind in ("upload_error", "upload_skipped") if (n := sum(e["event"] == kind for e in run.events))
    ]
    return text + "".join(f"; {n} {kind.replace('_', ' ')}" for n, kind in counts)


def render_status(run: RunHistory, with_history: bool = True) -> str:
    """`curry-train status`: the headline on the first line, then progress, history and storage."""
    store = RunDir(run.path)
    latest = store.latest()
    world = run.attempts[-1].start.get("world_size", "?") if run.attempts else "?"
    lines = [
        f"{run.name}: {headline(run)}",
        f"  {_progress(run)}, world size {world}, latest -> {latest.relpath if latest else 'none'}",
    ]
    if with_history:
        lines.append("history:")
        lines += [f"  {line}" for line in history_lines(run)]
    lines += cadence_lines(run)
    lines.append(storage_line(run))
    remote = remote_line(run, latest.step if latest else None)
    if remote is not None:
        lines.append(remote)
    return "\n".join(lines)


_CLAMPED = {
    "min": "; raised to checkpoint.auto_min_every",
    "max": "; lowered to checkpoint.auto_max_every",
    "overhead": "; raised so saves cost at most checkpoint.max_overhead of training time",
}


def cadence_lines(run: RunHistory) -> list[str]:
    """The automatic interval in force for each `auto` role (its newest `cadence` event), and why."""
    newest = {e.get("role"): e for e in run.events if e["event"] == "cadence"}
    lines = []
    for role, e in newest.items():
        optimum, mtbf = e.get("optimum_steps"), e.get("mtbf_seconds")
        if isinstance(optimum, (int, float)) and isinstance(mtbf, (int, float)):
            why = (
                f"Daly's optimum {optimum:.1f} steps for a save cost of {in_words(e.get('save_seconds'))} s, a step "
                f"of {in_words(e.get('step_seconds'))} s and an MTBF of {mtbf / 3600:.3g} h after "
                f"{plural(int(e.get('interruptions') or 0), 'interruption')}{_CLAMPED.get(str(e.get('clamped')), '')}"
            )
        else:
            why = "nothing measured yet: the first save comes early, at checkpoint.auto_min_every"
        lines.append(f"cadence: {role} every {e.get('every', '?')} steps since step {e['step']} ({why})")
    return lines


# ---------------------------------------------------------------------------------------------------- diff


def config_diff(a: RunHistory, b: RunHistory) -> list[tuple[str, Any, Any]]:
    """(key, value in a, value in b) for every dotted config key that differs; a missing key shows as <absent>."""
    fa, fb = flatten(a.config), flatten(b.config)
    absent = "<absent>"
    return [
        (k, fa.get(k, absent), fb.get(k, absent))
        for k in sorted(fa.keys() | fb.keys())
        if fa.get(k, absent) != fb.get(k, absent)
    ]


def _span(steps: list[int]) -> str:
    contiguous = steps == list(range(steps[0], steps[-1] + 1))
    return f"steps {steps[0]}-{steps[-1]}" if contiguous else f"{len(steps)} common steps in {steps[0]}-{steps[-1]}"


def metric_diff(a: RunHistory, b: RunHistory, key: str) -> str | None:
    """One line comparing `key` at the steps both runs have it; None when they share none."""
    ca, cb = a.current, b.current
    steps = sorted(
        s
        for s in ca.keys() & cb.keys()
        if isinstance(ca[s].get(key), (int, float)) and isinstance(cb[s].get(key), (int, float))
    )
    if not steps:
        return None
    differing = [s for s in steps if ca[s][key] != cb[s][key]]
    if not differing:
        return f"{key}: bitwise identical over {_span(steps)}"
    first = differing[0]
    worst = max(differing, key=lambda s: abs(ca[s][key] - cb[s][key]))
    diff = abs(ca[worst][key] - cb[worst][key])
    rel = diff / max(abs(ca[worst][key]), 1e-30)
    return (
        f"{key}: differs at {len(differing)} of {len(steps)} common steps ({_span(steps)}); first at step {first} "
        f"({ca[first][key]:.6g} vs {cb[first][key]:.6g}); largest difference {diff:.3g} at step {worst} "
        f"(relative {rel:.3g})"
    )


def render_diff(a: RunHistory, b: RunHistory) -> str:
    """`curry-train diff`: each run's headline as `status` opens with it, then progress, the differing config keys,
    and the metrics at common steps. The headlines are 'name: facts' separated by ';' (a headline's own facts are
    separated by ','), so which run each fact belongs to is never in doubt."""
    lines = [f"{a.name}: {headline(a)}; {b.name}: {headline(b)}"]
    lines.append(f"  {a.name}: {_progress(a)}")
    lines.append(f"  {b.name}: {_progress(b)}")
    changed = config_diff(a, b)
    lines.append(
        f"config: {len(changed)} key{' differs' if len(changed) == 1 else 's differ'}" + (":" if changed else "")
    )
    width = max((len(k) for k, _, _ in changed), default=0)
    lines += [f"  {k:<{width}}  {va!r} -> {vb!r}" for k, va, vb in changed]
    compared = [line for key in COMPARED_METRICS if (line := metric_diff(a, b, key)) is not None]
    lines.append("metrics at common steps:" if compared else "metrics: no common steps")
    lines += [f"  {line}" for line in compared]
    return "\n".join(lines)
