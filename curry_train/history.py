"""A run's history read back from its directory: launches (attempts), where each stopped, and its events
(`history_text.py` puts them in words). No torch and no Hydra, so `curry-train status|diff` start fast.

It also measures what the checkpoint cadence is chosen from: the cost of recent full saves, the time of recent steps,
and the run's interruptions (`curry-train plan` and `checkpoint.*_every=auto` read them here, alike).

Each launch journals `run_start` (with its `attempt`) and ends with `run_end` (finished), `preempt` (saved and
stopped) or nothing at all (killed, crashed). For the last case the next launch journals `attempt_end` with the
last step that attempt completed, read from `metrics.jsonl` (every line carries its launch's `attempt`).
"""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from curry_train.checkpoint.cadence import Timing, mtbf_estimate
from curry_train.journal import Journal, read_journal
from curry_train.layout import JOURNAL, METRICS, RunFiles
from curry_train.metrics import by_step, read_metric_lines

# Events that end a launch in order: after them the next launch needs no `attempt_end`.
ENDING_EVENTS = frozenset({"run_end", "preempt", "attempt_end"})


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
    line = last_step_of_each_attempt(read_metric_lines(RunFiles(run_dir).metrics)).get(attempt)
    # No metrics line at all: it stopped before its first step completed, so at the step it started from.
    last_step = int(line["step"]) if line else int(start["step"])
    fields: dict[str, Any] = {"attempt": attempt, "started_step": int(start["step"])}
    if line and isinstance(line.get("time"), (int, float)):
        fields["last_step_time"] = datetime.fromtimestamp(line["time"], UTC).isoformat(timespec="milliseconds")
    errors = [e for e in events[starts[-1] :] if e["event"] in ("error", "hang")]
    if errors and errors[0]["event"] == "hang":  # the first rank to give up says why; the rest followed it
        hang = errors[0]
        fields["reason"] = f"hung: rank {hang.get('rank', '?')} made no progress during {hang.get('phase', '?')}"
        if hang.get("lost_named"):
            fields["reason"] += f", lost {hang['lost_named']}"
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
        return by_step(self.lines)

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
    files = RunFiles(path)
    if not files.journal.is_file():
        raise FileNotFoundError(f"{path} is not a run directory (no {JOURNAL})")
    events = read_journal(files.journal)
    lines = read_metric_lines(files.metrics)
    config_path = files.config
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


# ------------------------------------------------------------------ what the checkpoint cadence is chosen from

RECENT_SAVES = 5  # the save cost is the median of this many newest full saves: a slowdown shows after a few
RECENT_STEPS = 100  # the step time is the median of this many newest step-to-step intervals
_TAIL_BYTES = 64 * 1024  # enough metrics lines for RECENT_STEPS intervals without reading a long run's whole file


def save_costs(run_dir: Path, async_save: bool) -> list[float]:
    """What training paid for each full save in this run's journal, in order.

    Asynchronous saves cost training their ``cost_seconds`` (blocked time plus the extra time of the steps they
    overlapped), at least their ``blocking_seconds``: the journal's estimate of the extra carries the steps' noise
    either way, but training paid the blocked time for sure. Synchronous saves cost their ``seconds``. Hard-linked
    saves (``linked_from``) cost nothing and are skipped.
    """
    path = RunFiles(run_dir).journal
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
            floor = r.get("blocking_seconds") if async_save else None
            values.append(max(float(value), float(floor)) if isinstance(floor, (int, float)) else float(value))
    return values


def measured_save_seconds(
    run_dir: Path, async_save: bool, recent: int | None = RECENT_SAVES
) -> tuple[float, int] | None:
    """Median of `save_costs` over the ``recent`` newest full saves (None: all), and how many it covers."""
    values = save_costs(run_dir, async_save)
    values = values[-recent:] if recent else values
    return (statistics.median(values), len(values)) if values else None


def measured_step_seconds(run_dir: Path, recent: int | None = RECENT_STEPS) -> tuple[float, int] | None:
    """Median wall time between consecutive steps among the ``recent`` newest intervals in metrics.jsonl (None:
    all), and how many it covers."""
    lines = read_metric_lines(RunFiles(run_dir).metrics, _TAIL_BYTES if recent else None)
    points = [(line["step"], float(line["time"])) for line in lines if isinstance(line.get("time"), (int, float))]
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
            (measured[0], f"median of the last {measured[1]} full saves in {JOURNAL}")
            if measured
            else (None, "no full save measured yet")
        )
        if measured and async_save:
            save_source += " (their cost to training: saves are asynchronous)"
    if step_seconds is None:
        measured = measured_step_seconds(run_dir)
        step_seconds, step_source = (
            (measured[0], f"median of the last {measured[1]} steps in {METRICS}")
            if measured
            else (None, "no step measured yet")
        )
    path = RunFiles(run_dir).journal
    history = interruptions(read_journal(path)) if path.is_file() else Interruptions(0, 0.0)
    prior = mtbf_hours * 3600.0
    mtbf = mtbf_estimate(prior, history.training_seconds, history.count)
    mtbf_source = (
        f"{mtbf_key}={mtbf_hours:g} as a prior, with {history.count} "
        f"interruption{'' if history.count == 1 else 's'} in "
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
