"""`curry-train plot` of runs with a loss spike: the y-axis shows the curves, and the spike is marked and labelled.

The run directories are written here as the harness writes them (journal.jsonl, metrics.jsonl): the plot reads
files, and a loss of 61 among losses of 2 to 5.5 is what a spike looks like on this project's runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from curry_train.history import read_run
from curry_train.plot import find_spikes

TIME = "2026-01-01T00:00:00+00:00"


def _loss(step: int) -> float:
    return 2.0 + 3.5 * math.exp(-(step - 1) / 8)  # 5.5 at step 1, falling towards 2


def _write_run(path: Path, lines: list[dict], events: list[dict]) -> Path:
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps({"attempt": 0, **line}) + "\n" for line in lines))
    start = {"event": "run_start", "time": TIME, "step": 0, "attempt": 0, "world_size": 1}
    (path / "journal.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [start, *events]))
    return path


def _rolled_back(root: Path) -> Path:
    """A spike the detector saw at step 26 (loss 61, marked), rolled back to step 15 and redone to step 40."""
    lines = [{"step": s, "loss": _loss(s), "lr": 1e-3} for s in range(1, 26)]
    lines.append({"step": 26, "loss": 61.0, "lr": 1e-3, "spike": True})
    lines += [{"step": s, "loss": _loss(s), "lr": 1e-3} for s in range(16, 41)]
    rollback = {"event": "rollback", "time": TIME, "step": 15, "spike_step": 26, "loss": 61.0, "baseline": 2.1}
    return _write_run(root / "spiky", lines, [rollback])


def _unseen(root: Path) -> Path:
    """A spike at step 6 the detector could not see (not yet armed): unmarked, recovering over three steps."""
    bumps = {6: 61.0, 7: 20.0, 8: 12.0}
    lines = [{"step": s, "loss": bumps.get(s, _loss(s)), "lr": 1e-3} for s in range(1, 41)]
    return _write_run(root / "unseen", lines, [])


def test_find_spikes_keeps_a_falling_start_and_groups_a_recovery() -> None:
    falling = [(s, _loss(s), False) for s in range(1, 41)]
    assert find_spikes(falling) == []
    bumped = [(s, {6: 61.0, 7: 20.0, 8: 12.0}.get(s, loss), False) for s, loss, _ in falling]
    assert find_spikes(bumped) == [[(6, 61.0), (7, 20.0), (8, 12.0)]]
    assert find_spikes([(1, 3.0, False), (2, math.nan, False), (3, 2.9, False)])[0][0][0] == 2


def test_plot_of_a_spike_shows_the_curves_and_labels_the_spike(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from curry_train.plot import plot_runs

    runs = [read_run(_rolled_back(tmp_path)), read_run(_unseen(tmp_path))]
    result = plot_runs(runs, tmp_path / "spike.png")
    ax = result.figure.axes[0]
    low, high = ax.get_ylim()
    # Every curve's loss (2 to 5.5) is inside the axis, and the axis stops well short of the spike.
    assert high >= 5.5 and high < 8 and low < 2.0
    assert result.spikes == {"spiky": [(26, 61.0)], "unseen": [(6, 61.0), (7, 20.0), (8, 12.0)]}
    labels = [text.get_text() for text in ax.texts]
    assert "spike at step 26: loss 61 (off the scale)" in labels
    assert "spike at step 6: loss 61 (off the scale)" in labels
    assert (tmp_path / "spike.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_without_a_spike_keeps_its_range(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from curry_train.plot import plot_runs

    lines = [{"step": s, "loss": _loss(s), "lr": 1e-3} for s in range(1, 41)]
    result = plot_runs([read_run(_write_run(tmp_path / "calm", lines, []))])
    assert result.spikes == {"calm": []}
    assert not [t for t in result.figure.axes[0].texts if t.get_text().startswith("spike")]
    assert result.figure.axes[0].get_ylim()[1] >= 5.5
