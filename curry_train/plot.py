"""`curry-train plot`: train and dev loss against step for one or more runs, overlaid, with the run's events.

One colour per run. Train loss is a solid line, dev loss a dashed line with dots. Steps a later attempt redid are
drawn faint and dotted (the killed attempt's losses). Events: each run has a row of markers along the bottom
(saves by role, deletions as x), a resume is a dashed vertical line, a rollback a solid one with the rolled-back
steps shaded. Any other journal event that is not routine gets a small diamond in the row, so nothing is hidden.
A loss spike (a line the detector marked, or a loss far above those just before it) would set the y-axis and
flatten every curve into a band: the axis stops above the other losses, and each spike is a red marker with its
loss written beside it, on the top edge when it is off the scale.
matplotlib is optional (`pip install 'curry-train[plot]'`) and is imported only here, with the Agg backend.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curry_train.history import RunHistory
from curry_train.history_text import ROUTINE_EVENTS

SAVE_MARKERS = {"rollback": "|", "recovery": "s", "best_k": "*"}
ROW_HEIGHT = 0.045  # each run's event row, in axes fraction from the bottom
SPIKE_FACTOR = 2.0  # a loss more than twice the median of the losses just before it is a spike on the plot
SPIKE_CONTEXT = 10


@dataclass
class PlotResult:
    """What was drawn, so callers (and tests) can check it without reading pixels."""

    figure: Any
    train_lines: dict[str, Any] = field(default_factory=dict)  # run name -> its train-loss line
    dev_lines: dict[str, Any] = field(default_factory=dict)
    superseded_lines: dict[str, Any] = field(default_factory=dict)
    events: dict[str, list[str]] = field(default_factory=dict)  # run name -> kinds of event marked
    spikes: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # run name -> (step, loss) marked


class PlotError(Exception):
    """`plot` cannot draw: the message says what to do (the CLI prints it and exits 2)."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plot needs matplotlib, an optional dependency: pip install 'curry-train[plot]'") from None
    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


def _superseded(run: RunHistory) -> list[tuple[int, float]]:
    """(step, loss) of metrics lines a later line of the same step replaced: work a resume or rollback redid."""
    last_index = {line["step"]: i for i, line in enumerate(run.lines)}
    return [
        (line["step"], line["loss"])
        for i, line in enumerate(run.lines)
        if last_index[line["step"]] != i and isinstance(line.get("loss"), (int, float))
    ]


def _curves(ax: Any, run: RunHistory, color: str, order: int, result: PlotResult) -> None:
    current = run.current
    steps = sorted(s for s in current if isinstance(current[s].get("loss"), (int, float)))
    # Earlier runs wider and lighter: a run that matches another exactly still shows as a line inside a band.
    width = 5.0 if order == 0 else 1.8
    (result.train_lines[run.name],) = ax.plot(
        steps,
        [current[s]["loss"] for s in steps],
        color=color,
        lw=width,
        alpha=0.55 if order == 0 else 0.95,
        label=f"{run.name} train",
        solid_capstyle="round",
    )
    dev = sorted(s for s in current if isinstance(current[s].get("dev_loss"), (int, float)))
    if dev:
        (result.dev_lines[run.name],) = ax.plot(
            dev,
            [current[s]["dev_loss"] for s in dev],
            color=color,
            lw=1.2,
            ls="--",
            marker="o",
            ms=4,
            label=f"{run.name} dev",
        )
    old = _superseded(run)
    if old:
        (result.superseded_lines[run.name],) = ax.plot(
            [s for s, _ in old],
            [v for _, v in old],
            color=color,
            lw=1,
            ls=":",
            alpha=0.45,
            label=f"{run.name} redone steps (earlier attempt)",
        )


def _events(ax: Any, run: RunHistory, color: str, row: int, result: PlotResult) -> None:
    """Markers in the run's row along the bottom, and vertical lines for resumes and rollbacks."""
    y = 0.025 + row * ROW_HEIGHT
    strip = ax.get_xaxis_transform()  # x in steps, y in axes fraction
    marked = result.events.setdefault(run.name, [])
    batch = (run.config.get("train") or {}).get("batch_size")
    for event in run.events:
        kind, step = event["event"], event["step"]
        if kind == "save":
            marker = SAVE_MARKERS.get(str(event.get("role")), "o")
            lift = 0.014 if marker == "*" else 0.0  # best-K shares steps with the cadence saves: keep it visible
            ax.plot(
                [step],
                [y + lift],
                marker=marker,
                color=color,
                ms=7 if marker == "|" else 5,
                transform=strip,
                clip_on=False,
                ls="none",
            )
        elif kind == "delete":
            ax.plot([step], [y], marker="x", color="0.45", ms=5, transform=strip, ls="none")
        elif kind == "resume":
            ax.axvline(step, color=color, ls="--", lw=1.1, alpha=0.9)
            ax.text(step, 0.97, f" resume @{step}", transform=strip, color=color, va="top", fontsize=8, rotation=90)
        elif kind == "rollback":
            ax.axvline(step, color=color, ls="-", lw=1.3, alpha=0.9)
            spike = event.get("spike_step", event.get("abandoned_from"))
            if isinstance(spike, int) and spike > step:
                ax.axvspan(step, spike, color=color, alpha=0.12, lw=0)
            for lo, hi in _skipped_steps(event.get("skipped"), batch):
                ax.axvspan(lo, hi, ymin=y - 0.015, ymax=y + 0.015, color=color, alpha=0.5, lw=0)
            ax.text(step, 0.97, f" rollback to {step}", transform=strip, color=color, va="top", fontsize=8, rotation=90)
        elif kind not in ROUTINE_EVENTS:
            ax.plot(
                [step],
                [y + 0.02],
                marker="D",
                color="crimson" if kind == "error" else color,
                ms=5,
                transform=strip,
                ls="none",
            )
            ax.text(step, y + 0.035, f" {kind}", transform=strip, fontsize=7, color="0.25")
        else:
            continue
        marked.append(kind)


def _skipped_steps(ranges: object, batch: object) -> list[tuple[float, float]]:
    """Skipped global sample ranges [a, b) as step spans: a step consumes `batch` samples."""
    if not isinstance(ranges, list) or not isinstance(batch, int) or batch <= 0:
        return []
    return [(r[0] / batch, r[1] / batch) for r in ranges if isinstance(r, list) and len(r) == 2]


def find_spikes(losses: list[tuple[int, float, bool]]) -> list[list[tuple[int, float]]]:
    """Groups of consecutive spiked lines, in order, from (step, loss, marked by the detector) in metrics order.

    A line is a spike when the detector marked it, when its loss is not finite, or when it is more than
    `SPIKE_FACTOR` times the median of the `SPIKE_CONTEXT` losses before it (so a spike the detector could not see,
    before it armed or with it off, is found too). A falling curve's first losses never are: nothing comes before
    them, and each is below its predecessors. Spiked losses stay out of the baseline, so a slow recovery after a
    spike stays marked until the loss is back near where it was."""
    groups: list[list[tuple[int, float]]] = []
    recent: deque[float] = deque(maxlen=SPIKE_CONTEXT)
    previous_spiked = False
    for step, loss, marked in losses:
        jump = bool(recent) and loss > SPIKE_FACTOR * statistics.median(recent)
        if marked or not math.isfinite(loss) or jump:
            if not previous_spiked:
                groups.append([])
            groups[-1].append((step, loss))
            previous_spiked = True
        else:
            recent.append(loss)
            previous_spiked = False
    return groups


def _losses(run: RunHistory) -> list[tuple[int, float, bool]]:
    """(step, loss, marked a spike) of every metrics line with a loss, in file order (redone steps included)."""
    return [
        (line["step"], float(line["loss"]), bool(line.get("spike")))
        for line in run.lines
        if isinstance(line.get("loss"), (int, float))
    ]


def _clip_to_curves(ax: Any, runs: list[RunHistory], spikes: dict[str, list[list[tuple[int, float]]]]) -> None:
    """A y-range that shows the curves: when a spike lies above every other loss, the axis stops above the rest."""
    spiked = {(run.name, step, loss) for run in runs for group in spikes[run.name] for step, loss in group}
    rest = [loss for run in runs for step, loss, _ in _losses(run) if (run.name, step, loss) not in spiked]
    rest += [float(line["dev_loss"]) for run in runs for line in run.lines if _finite(line.get("dev_loss"))]
    rest = [v for v in rest if math.isfinite(v)]
    if not rest or not spiked or all(math.isfinite(loss) and loss <= max(rest) for _, _, loss in spiked):
        return
    low, high = min(rest), max(rest)
    ax.set_ylim(low - 0.05 * (high - low), high + 0.12 * (high - low or 1.0))


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _mark_spikes(ax: Any, run: RunHistory, groups: list[list[tuple[int, float]]], result: PlotResult) -> None:
    """A red marker on each spiked step, and each group's peak loss written beside it; on the top edge when the
    loss is off the scale."""
    top = ax.get_ylim()[1]
    result.spikes[run.name] = [point for group in groups for point in group]
    for group in groups:
        for step, loss in group:
            off = not math.isfinite(loss) or loss > top
            ax.plot(
                [step],
                [top if off else loss],
                marker="^" if off else "o",
                color="crimson",
                mfc="crimson" if off else "none",
                ms=8,
                mew=1.5,
                ls="none",
                clip_on=False,
                zorder=5,
            )
        step, loss = max(group, key=lambda point: point[1] if math.isfinite(point[1]) else math.inf)
        off = not math.isfinite(loss) or loss > top
        label = f"spike at step {step}: loss {loss:.4g}" + (" (off the scale)" if off else "")
        ax.annotate(
            label,
            (step, top if off else loss),
            xytext=(7, -4),
            textcoords="offset points",
            color="crimson",
            fontsize=8,
            va="top",
            annotation_clip=False,
        )


def _legend(ax: Any, plt: Any) -> None:
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    extra = [
        (Line2D([], [], marker="|", color="0.3", ls="none", ms=8), "rollback save"),
        (Line2D([], [], marker="s", color="0.3", ls="none", ms=5), "recovery save"),
        (Line2D([], [], marker="*", color="0.3", ls="none", ms=6), "best-K save"),
        (Line2D([], [], marker="x", color="0.45", ls="none", ms=5), "deleted since (x on its save)"),
        (Line2D([], [], color="0.3", ls="--"), "resume"),
        (Line2D([], [], color="0.3", ls="-"), "rollback (shaded: rolled-back steps)"),
        (Line2D([], [], color="0.3", lw=6, alpha=0.5), "skipped data (in the run's row)"),
        (Line2D([], [], marker="D", color="0.3", ls="none", ms=5), "other event (named)"),
        (Line2D([], [], marker="^", color="crimson", ls="none", ms=6), "loss spike (its loss written beside it)"),
    ]
    # Outside the axes, so it never covers a curve or an event label.
    ax.legend(
        handles + [h for h, _ in extra],
        labels + [t for _, t in extra],
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        borderaxespad=0.0,
        frameon=False,
    )


def plot_runs(runs: list[RunHistory], output: str | Path | None = None, title: str | None = None) -> PlotResult:
    """Draw the runs on one axes; write a PNG to `output` when given. Returns the figure and its lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 6), dpi=110)
    result = PlotResult(fig)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        _curves(ax, run, color, i if len(runs) > 1 else 1, result)
        _events(ax, run, color, i, result)
    spikes = {run.name: find_spikes(_losses(run)) for run in runs}
    _clip_to_curves(ax, runs, spikes)
    for run in runs:
        _mark_spikes(ax, run, spikes[run.name], result)
    # Room at the bottom for the event rows, so markers never sit on the curves.
    low, high = ax.get_ylim()
    ax.set_ylim(low - (high - low) * (0.06 + ROW_HEIGHT * len(runs)), high)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss: " + ", ".join(run.name for run in runs), fontsize=11)
    ax.grid(alpha=0.25)
    _legend(ax, plt)
    fig.tight_layout()
    if output is not None:
        fig.savefig(output)
    return result
