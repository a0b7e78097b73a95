"""A run's history read back from its directory: launches (attempts), where each stopped, and the events worth a
line of their own (resumes, rollbacks, preemptions, world-size changes, errors, and any event this module does not
know). Stdlib and YAML only, so `curry-train status|diff` start fast.

It also measures what the checkpoint cadence is chosen from: the cost of recent full saves, the time of recent steps,
and the run's interruptions (`curry-train plan` and `checkpoint.*_every=auto` read them here, alike).

Each launch journals `run_start` (with its `attempt`) and ends with `run_end` (finished), `preempt` (saved and
stopped) or nothing at all (killed, crashed). For the last case the next launch journals `attempt_end` with the
last step that attempt completed, read from `metrics.jsonl` (every line carries its launch's `attempt`).
"""

from __future__ import annotations

import contextlib
import json
import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from curry_train.checkpoint.cadence import Timing, mtbf_estimate
from curry_train.journal import Journal, read_journal

# Events that end a launch in order: after them the next launch needs no `attempt_end`.
ENDING_EVENTS = frozenset({"run_end", "preempt", "attempt_end"})
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


def read_metric_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of `metrics.jsonl` in order (a resumed run's redone steps appear twice); a line cut off by a
    crash is skipped."""
    if not path.is_file():
        return []
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(raw)
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                lines.append(record)
    return lines


def last_step_of_each_attempt(lines: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """attempt -> its last metrics line: the last step it completed (its last line, not its largest step, since a
    rollback inside a launch takes the step back)."""
    last: dict[int, dict[str, Any]] = {}
    for line in lines:
        last[int(line.get("attempt", 0))] = line
    return last


def end_unfinished_attempt(journal: Journal, run_dir: Path) -> dict[str, Any] | None:
    """At the start of a launch: if the previous one left no `run_end`/`preempt`, journal `attempt_end` with the
    last step it completed. Returns the record written, or None. Call before this launch's `run_start`."""
    if not journal.enabled or not journal.path.is_file():
        return None
    events = read_journal(journal.path)
    starts = [i for i, e in enumerate(events) if e["event"] == "run_start"]
    if not starts:
        return None
    start = events[starts[-1]]
    if any(e["event"] in ENDING_EVENTS for e in events[starts[-1] :]):
        return None
    attempt = int(start.get("attempt", len(starts) - 1))
    line = last_step_of_each_attempt(read_metric_lines(run_dir / "metrics.jsonl")).get(attempt)
    # No metrics line at all: it stopped before its first step completed, so at the step it started from.
    last_step = int(line["step"]) if line else int(start["step"])
    fields: dict[str, Any] = {"attempt": attempt, "started_step": int(start["step"])}
    if line and isinstance(line.get("time"), (int, float)):
        fields["last_step_time"] = datetime.fromtimestamp(line["time"], UTC).isoformat(timespec="milliseconds")
    errors = [e for e in events[starts[-1] :] if e["event"] in ("error", "hang")]
    if errors and errors[0]["event"] == "hang":  # the first rank to give up says why; the rest followed it
        hang = errors[0]
        fields["reason"] = f"hung: rank {hang.get('rank', '?')} made no progress during {hang.get('phase', '?')}"
    elif errors:
        fields["reason"] = f"ended after an error: {errors[-1].get('reason', '?')}"
    else:
        fields["reason"] = "no run_end or preempt: the launch was killed or crashed"
    return journal.append("attempt_end", last_step, **fields)


@dataclass
class Attempt:
    """One launch of the run."""

    number: int
    start: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    last_line: dict[str, Any] | None = None  # its last metrics line

    @property
    def end(self) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events) if e["event"] in ENDING_EVENTS), None)

    @property
    def resume(self) -> dict[str, Any] | None:
        return next((e for e in self.events if e["event"] == "resume"), None)

    @property
    def last_step(self) -> int | None:
        """The last step it completed: journaled (`attempt_end`, `run_end`, `preempt`) or from its metrics."""
        end = self.end
        if end is not None:
            return int(end["step"])
        return int(self.last_line["step"]) if self.last_line else None


@dataclass
class RunHistory:
    path: Path
    events: list[dict[str, Any]]
    lines: list[dict[str, Any]]
    config: dict[str, Any]
    attempts: list[Attempt]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def current(self) -> dict[int, dict[str, Any]]:
        """step -> its current metrics line (a redone step's later line wins)."""
        return {line["step"]: line for line in self.lines}

    @property
    def total_steps(self) -> int | None:
        steps = self.config.get("train", {}).get("steps")
        return int(steps) if isinstance(steps, int) else None

    @property
    def resumes(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "resume"]

    def count(self, event: str) -> int:
        return sum(1 for e in self.events if e["event"] == event)


def read_run(path: str | Path) -> RunHistory:
    """Read a run directory's journal, metrics and config; raises FileNotFoundError naming what is missing."""
    path = Path(path)
    journal = path / "journal.jsonl"
    if not journal.is_file():
        raise FileNotFoundError(f"{path} is not a run directory (no journal.jsonl)")
    events = read_journal(journal)
    lines = read_metric_lines(path / "metrics.jsonl")
    config_path = path / "config.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    attempts: list[Attempt] = []
    for event in events:
        if event["event"] == "run_start":
            attempts.append(Attempt(int(event.get("attempt", len(attempts))), event))
        elif attempts:
            attempts[-1].events.append(event)
    last_lines = last_step_of_each_attempt(lines)
    for attempt in attempts:
        attempt.last_line = last_lines.get(attempt.number)
    return RunHistory(path, events, lines, config or {}, attempts)


# -------------------------------------------------------------------------------------------------- facts


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
        return (
            f"rank {event.get('rank', '?')} on {event.get('host', '?')} hung during {event.get('phase', '?')}: "
            f"no progress for {event.get('seconds', '?')} s (stacks in failures.log)"
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


# ------------------------------------------------------------------ what the checkpoint cadence is chosen from

RECENT_SAVES = 5  # the save cost is the median of this many newest full saves: a slowdown shows after a few
RECENT_STEPS = 100  # the step time is the median of this many newest step-to-step intervals
_TAIL_BYTES = 64 * 1024  # enough metrics lines for RECENT_STEPS intervals without reading a long run's whole file


def save_costs(run_dir: Path, async_save: bool) -> list[float]:
    """What training paid for each full save in this run's journal, in order.

    Asynchronous saves cost training their ``cost_seconds`` (blocked time plus the extra time of the steps they
    overlapped), synchronous ones their ``seconds``. Hard-linked saves (``linked_from``) cost nothing and are skipped.
    """
    path = run_dir / "journal.jsonl"
    if not path.is_file():
        return []
    # Journals written before `cost_seconds` existed have only `blocking_seconds`; a save that finished before a
    # clean step was measured has `cost_seconds` null and falls back to it too.
    keys = ("cost_seconds", "blocking_seconds") if async_save else ("seconds",)
    values = []
    for r in read_journal(path):
        if r["event"] != "save" or r.get("linked_from") or r.get("contents", "full") != "full":
            continue
        value = next((r[k] for k in keys if isinstance(r.get(k), (int, float))), None)
        if value is not None:
            values.append(float(value))
    return values


def measured_save_seconds(
    run_dir: Path, async_save: bool, recent: int | None = RECENT_SAVES
) -> tuple[float, int] | None:
    """Median of `save_costs` over the ``recent`` newest full saves (None: all), and how many it covers."""
    values = save_costs(run_dir, async_save)
    values = values[-recent:] if recent else values
    return (statistics.median(values), len(values)) if values else None


def _tail_lines(path: Path, max_bytes: int) -> list[str]:
    """The whole lines among the last ``max_bytes`` of a file."""
    with path.open("rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - max_bytes))
        data = f.read()
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[1:] if size > max_bytes else lines  # the first may be cut


def measured_step_seconds(run_dir: Path, recent: int | None = RECENT_STEPS) -> tuple[float, int] | None:
    """Median wall time between consecutive steps among the ``recent`` newest intervals in metrics.jsonl (None:
    all), and how many it covers."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    raw = _tail_lines(path, _TAIL_BYTES) if recent else path.read_text(encoding="utf-8").splitlines()
    points = []
    for line in raw:
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record.get("step"), int) and "time" in record:
                points.append((record["step"], float(record["time"])))
    # Only step n -> n+1 pairs: a resume restarts the step count and a gap between launches is not a step.
    diffs = [t1 - t0 for (s0, t0), (s1, t1) in zip(points, points[1:], strict=False) if s1 == s0 + 1 and t1 > t0]
    diffs = diffs[-recent:] if recent else diffs
    return (statistics.median(diffs), len(diffs)) if diffs else None


@dataclass(frozen=True)
class Interruptions:
    """How often the run failed: launches that ended other than by finishing (crashed, killed, hung, preempted),
    and the training time they are counted over (each launch from its start to its last step)."""

    count: int
    training_seconds: float


def _seconds(iso: object) -> float | None:
    with contextlib.suppress(TypeError, ValueError):
        return datetime.fromisoformat(str(iso)).timestamp()
    return None


def interruptions(events: list[dict[str, Any]]) -> Interruptions:
    """The interruptions in a journal's events. The launch still running (the last, with no end) is not one, and
    counts up to its newest event."""
    launches: list[list[dict[str, Any]]] = []
    for event in events:
        if event["event"] == "run_start":
            launches.append([event])
        elif launches:
            launches[-1].append(event)
    count, seconds = 0, 0.0
    for launch in launches:
        end = next((e for e in launch if e["event"] in ENDING_EVENTS), None)
        if end is None:
            stop = _seconds(launch[-1]["time"])
        elif end["event"] == "attempt_end":  # journaled by the next launch: its last step, not its own time
            stop = _seconds(end.get("last_step_time"))
        else:
            stop = _seconds(end["time"])
        start = _seconds(launch[0]["time"])
        if start is not None and stop is not None:
            seconds += max(0.0, stop - start)
        count += end is not None and end["event"] != "run_end"
    return Interruptions(count, seconds)


def timing_of(
    run_dir: Path,
    async_save: bool,
    mtbf_hours: float,
    mtbf_key: str = "checkpoint.mtbf_hours",
    save_seconds: float | None = None,
    step_seconds: float | None = None,
) -> Timing:
    """The inputs of the cadence: given values win, else what this run measured (None: not measured yet); the
    MTBF is the prior ``mtbf_hours`` (named ``mtbf_key`` in its source) combined with the run's interruptions."""
    save_source, step_source = "given", "given"
    if save_seconds is None:
        measured = measured_save_seconds(run_dir, async_save)
        save_seconds, save_source = (
            (measured[0], f"median of the last {measured[1]} full saves in journal.jsonl")
            if measured
            else (None, "no full save measured yet")
        )
        if measured and async_save:
            save_source += " (their cost to training: saves are asynchronous)"
    if step_seconds is None:
        measured = measured_step_seconds(run_dir)
        step_seconds, step_source = (
            (measured[0], f"median of the last {measured[1]} steps in metrics.jsonl")
            if measured
            else (None, "no step measured yet")
        )
    path = run_dir / "journal.jsonl"
    history = interruptions(read_journal(path)) if path.is_file() else Interruptions(0, 0.0)
    prior = mtbf_hours * 3600.0
    mtbf = mtbf_estimate(prior, history.training_seconds, history.count)
    mtbf_source = (
        f"{mtbf_key}={mtbf_hours:g} as a prior, with {plural(history.count, 'interruption')} in "
        f"{history.training_seconds / 3600:.3g} h of this run's training: (prior + T) / (1 + n)"
    )
    return Timing(
        save_seconds,
        save_source,
        step_seconds,
        step_source,
        mtbf,
        mtbf_source,
        history.count,
        history.training_seconds,
        prior,
    )
