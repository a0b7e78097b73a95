"""A run's history in words, for `curry-train status` and `diff`: the headline, one line per launch and per event
worth one (resumes, rollbacks, preemptions, world-size changes, errors, hangs, warm starts, and any event no phrasing
here knows, shown field by field), every value in words rather than JSON, never cut inside a word."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any

from curry_train.history import ENDING_EVENTS, Attempt, RunHistory

# Routine bookkeeping: counted, never a history line of its own. Every other event is one (unknown ones too).
# `cadence` decisions are many; `status` shows the one in force on a line of its own.
ROUTINE_EVENTS = frozenset(
    {"run_start", "policy", "save", "delete", "best_k", "latest", "run_end", "attempt_end", "cadence"}
)


def short_time(iso: object) -> str:
    """An ISO time as 'YYYY-MM-DD HH:MM:SS' UTC; anything else as written."""
    text = str(iso)
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(text).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return text


def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def shorten(text: str, limit: int) -> str:
    """`text` cut at a space to at most `limit` characters, ending in '...'; never inside a word (one long word
    stays whole)."""
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit - 3)
    return text if cut <= 0 else text[:cut].rstrip(",;:") + " ..."


def in_words(value: object, limit: int = 80) -> str:
    """A journal field's value as text: numbers short, lists and mappings as comma-separated items, never JSON."""
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif value is None:
        text = "none"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(in_words(v, limit) for v in value) or "none"
    elif isinstance(value, dict):
        text = ", ".join(f"{k} {in_words(v, limit)}" for k, v in value.items()) or "none"
    else:
        text = str(value)
    return shorten(text, limit)


def _ranges(ranges: object) -> str:
    """[[0, 8], [16, 24]] -> 'samples [0, 8), [16, 24)'."""
    if not isinstance(ranges, list) or not ranges:
        return "no samples"
    parts = [f"[{r[0]}, {r[1]})" if isinstance(r, list) and len(r) == 2 else in_words(r) for r in ranges]
    return "samples " + ", ".join(parts)


def headline(run: RunHistory) -> str:
    """The run's story in a few words: 'resumed from step 40 (1 resume)' or 'ran straight through'."""
    parts = []
    init = next((e for e in run.events if e["event"] == "init"), None)
    if init is not None:
        parts.append(f"initialised from {init.get('source', '?')}")
    resumes = run.resumes
    if resumes:
        steps = ", ".join(str(e["step"]) for e in resumes)
        parts.append(f"resumed from step{'s' if len(resumes) > 1 else ''} {steps} ({plural(len(resumes), 'resume')})")
    rollbacks = [e for e in run.events if e["event"] == "rollback"]
    if rollbacks:
        steps = ", ".join(str(e["step"]) for e in rollbacks)
        parts.append(f"rolled back to step{'s' if len(rollbacks) > 1 else ''} {steps}")
    for event, word in (("preempt", "preemption"), ("world_size_change", "world-size change"), ("error", "error")):
        if n := run.count(event):
            parts.append(plural(n, word))
    if len(parts) == (init is not None):
        parts.append("ran straight through")
    return ", ".join(parts)


def _attempt_end_fact(attempt: Attempt) -> str | None:
    end = attempt.end
    if end is None or end["event"] == "run_end":
        return None
    if end["event"] == "preempt" and end.get("forced"):
        return f"attempt {attempt.number} {_forced_stop(end)}"
    if end["event"] == "preempt":
        return f"attempt {attempt.number} preempted ({end.get('signal', '?')}): saved step {end['step']} and stopped"
    return f"attempt {attempt.number} stopped after step {end['step']} ({end.get('reason', 'no reason recorded')})"


def _resume_fact(event: dict[str, Any], attempt: Attempt, previous: Attempt | None) -> str:
    redone = ""
    if previous is not None and previous.last_step is not None:
        redone = f", {plural(max(previous.last_step - int(event['step']), 0), 'step')} redone"
    how = "exact" if event.get("exact") else f"{event.get('contents', '?')} state, not exact"
    return (
        f"resumed from step {event['step']} at {short_time(event['time'])[11:]} (attempt {attempt.number}{redone}) "
        f"from {event.get('path', '?')}, {how}"
    )


def _rollback_fact(event: dict[str, Any]) -> str:
    spike = event.get("spike_step", event.get("abandoned_from"))
    text = f"rolled back to step {event['step']}" + (f" from step {spike}" if spike is not None else "")
    if isinstance(event.get("loss"), (int, float)):
        text += f" (loss {in_words(event['loss'])}" + (
            f", baseline {in_words(event['baseline'])})" if isinstance(event.get("baseline"), (int, float)) else ")"
        )
    elif "loss" in event:  # journaled as null: the loss was NaN or infinite
        text += " (loss not finite)"
    elif event.get("request"):
        text += f" (by request: +rollback_to={event['request']})"
    elif isinstance(event.get("reason"), str):
        text += f" ({shorten(event['reason'], 120)})"
    if event.get("injected"):
        text += " [spike injected by +debug.inject_spike_at]"
    if "skipped" in event:
        text += f"; skipped {_ranges(event['skipped'])}"
    if "optimizer_restored" in event:
        text += "; optimizer " + ("restored" if event["optimizer_restored"] else "starts fresh")
    aside = event.get("set_aside", event.get("abandoned"))
    if isinstance(aside, list):
        text += f"; {plural(len(aside), 'checkpoint')} set aside"
    return text


def _spike_injected_fact(event: dict[str, Any]) -> str:
    step = event["step"]
    return (
        f"spike injected by +debug.inject_spike_at: step {step}'s lr multiplied by {in_words(event.get('lr_scale'))}"
        f" (the loss of step {step + 1} shows it)"
    )


def _resume_fallback_fact(event: dict[str, Any]) -> str:
    problems = event.get("problems") if isinstance(event.get("problems"), list) else []
    first = shorten(str(problems[0]), 120) if problems else "no problem recorded"
    more = f" (and {plural(len(problems) - 1, 'more problem')})" if len(problems) > 1 else ""
    fallback = event.get("fallback")
    then = f"fell back to {fallback}" if fallback else "no other checkpoint to fall back to"
    return f"checkpoint {event.get('path', '?')} failed verification: {first}{more}; {then}"


def _generic_fact(event: dict[str, Any]) -> str:
    """Any event without a phrasing of its own: its name, step and each field as 'name value', shortened at a
    word, so an event this reader does not know is still shown whole enough to read."""
    fields = [
        f"{k.replace('_', ' ')} {in_words(v, 60)}"
        for k, v in event.items()
        if k not in ("event", "time", "step", "config")
    ]
    return f"{event['event']} at step {event['step']}" + (f": {'; '.join(fields)}" if fields else "")


def _forced_stop(event: dict[str, Any]) -> str:
    return f"stopped by a second {event.get('signal', 'signal')} during {event.get('during', '?')}"


def event_fact(event: dict[str, Any]) -> str:
    """One line for a non-routine event (resumes are phrased by `history_lines`, which knows the attempts)."""
    kind = event["event"]
    if kind == "rollback":
        return _rollback_fact(event)
    if kind == "world_size_change":
        return f"world size changed from {event.get('old', '?')} to {event.get('new', '?')} at step {event['step']}"
    if kind == "error":
        where = f" ({event['path']})" if "path" in event else ""
        return f"error at step {event['step']}{where}: {shorten(str(event.get('reason', '?')), 200)}"
    if kind == "preempt" and event.get("forced"):
        return _forced_stop(event)
    if kind == "hang":
        lost = f", lost {event['lost_named']}" if event.get("lost_named") else ""
        return (
            f"rank {event.get('rank', '?')} on {event.get('host', '?')} hung during {event.get('phase', '?')}: "
            f"no progress for {event.get('seconds', '?')} s{lost} (stacks in failures.log)"
        )
    if kind == "init":
        step = f", step {event['source_step']}" if event.get("source_step") is not None else ""
        excluded = event.get("excluded") or []
        return (
            f"initialised from {event.get('source', '?')} ({event.get('kind', '?')}{step}): {event.get('loaded', '?')} "
            "tensors"
            + (f", {len(excluded)} excluded" if excluded else "")
            + (", head from the tied embedding" if event.get("tied_head") else "")
            + (", with optimizer state" if event.get("optimizer") else "")
        )
    if kind == "preempt":
        return f"preempted ({event.get('signal', '?')}): saved step {event['step']} and stopped"
    if kind == "spike_injected":
        return _spike_injected_fact(event)
    if kind == "resume_fallback":
        return _resume_fallback_fact(event)
    return _generic_fact(event)


def history_lines(run: RunHistory) -> list[str]:
    """'time  fact' lines in journal order: launches, where each stopped, and every non-routine event."""
    out = []
    for i, attempt in enumerate(run.attempts):
        previous = run.attempts[i - 1] if i else None
        start = attempt.start
        if attempt.resume is None:
            ranks = start.get("world_size")
            on = plural(ranks, "rank") if isinstance(ranks, int) else "? ranks"
            out.append((start["time"], f"attempt {attempt.number} started at step {start['step']} on {on}"))
        for event in attempt.events:
            kind = event["event"]
            if kind == "resume":
                out.append((event["time"], _resume_fact(event, attempt, previous)))
            elif kind in ENDING_EVENTS and kind != "run_end":
                fact = _attempt_end_fact(attempt)
                if fact and event is attempt.end:
                    out.append((event["time"], fact))
            elif kind == "run_end":
                loss = event.get("last_loss")
                out.append(
                    (
                        event["time"],
                        f"finished at step {event['step']}"
                        + (f", last loss {loss:.4f}" if isinstance(loss, (int, float)) else ""),
                    )
                )
            elif kind not in ROUTINE_EVENTS:
                out.append((event["time"], event_fact(event)))
        if attempt.end is None and attempt is not run.attempts[-1] and attempt.last_step is not None:
            # An old journal without attempt_end: metrics still say where it stopped.
            out.append((start["time"], f"attempt {attempt.number} stopped after step {attempt.last_step} (killed)"))
    return [f"{short_time(time)}  {fact}" for time, fact in out]
