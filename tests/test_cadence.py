"""`checkpoint.*_every=auto`: the pure decision at its edges, the MTBF from a run's interruptions, and the config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from curry_train.checkpoint.cadence import (
    AutoBounds,
    Clamp,
    auto_interval,
    daly_interval,
    mtbf_estimate,
    optimum_moved,
)
from curry_train.checkpoint.policy import Policy, decide_save
from curry_train.compose import resolve
from curry_train.config import ConfigError
from curry_train.history import interruptions, timing_of
from curry_train.journal import Journal
from tests.conftest import compose_config

HOUR = 3600.0
WIDE = AutoBounds(min_every=1, max_every=10**9, max_overhead=1.0)


def test_the_interval_is_dalys_optimum_over_the_step_time() -> None:
    # C = 60 s, M = 24 h: Daly 3180.06 s (test_plan checks it by hand); at 2 s a step, 1590.03 steps.
    decision = auto_interval(60.0, 2.0, 24 * HOUR, WIDE)
    assert decision.optimum_steps == pytest.approx(daly_interval(60.0, 24 * HOUR) / 2.0)
    assert (decision.every, decision.clamped) == (1590, None)


def test_nothing_measured_yet_saves_early_at_the_minimum() -> None:
    bounds = AutoBounds(min_every=10, max_every=500, max_overhead=0.05)
    for save, step in ((None, 2.0), (60.0, None), (None, None), (0.0, 2.0)):
        assert auto_interval(save, step, 24 * HOUR, bounds) == auto_interval(None, None, 24 * HOUR, bounds)
    first = auto_interval(None, None, 24 * HOUR, bounds)
    assert (first.every, first.optimum_steps, first.clamped) == (10, None, Clamp.MIN)


def test_each_bound_says_that_it_decided() -> None:
    # Optimum 1590 steps (above): a minimum above it raises it, a maximum below it lowers it.
    raised = auto_interval(60.0, 2.0, 24 * HOUR, AutoBounds(2000, 5000, 1.0))
    assert (raised.every, raised.clamped) == (2000, Clamp.MIN)
    lowered = auto_interval(60.0, 2.0, 24 * HOUR, AutoBounds(10, 1000, 1.0))
    assert (lowered.every, lowered.clamped) == (1000, Clamp.MAX)
    # The overhead cap: a save every N steps costs C / (N x step); at most 1% means N >= 60 / (0.01 x 2) = 3000.
    capped = auto_interval(60.0, 2.0, 24 * HOUR, AutoBounds(10, 10**6, 0.01))
    assert (capped.every, capped.clamped) == (3000, Clamp.OVERHEAD)
    assert 60.0 / (capped.every * 2.0) <= 0.01 < 60.0 / ((capped.every - 1) * 2.0)
    # The maximum wins over both lower bounds: never more steps between saves than it allows.
    assert auto_interval(60.0, 2.0, 24 * HOUR, AutoBounds(10, 2500, 0.01)).every == 2500
    assert auto_interval(60.0, 2.0, 24 * HOUR, AutoBounds(10, 2500, 0.01)).clamped == Clamp.MAX


def test_a_save_dearer_than_the_mtbf() -> None:
    # C >= 2M: Daly's answer is M itself, 3600 steps of 1 s; saves would then cost 2 h per hour of training, so the
    # overhead cap (N >= 7200 / (0.05 x 1) = 144000) decides, unless the maximum is lower.
    decision = auto_interval(7200.0, 1.0, HOUR, AutoBounds(10, 10**6, 0.05))
    assert decision.optimum_steps == pytest.approx(3600.0)
    assert (decision.every, decision.clamped) == (144_000, Clamp.OVERHEAD)
    assert auto_interval(7200.0, 1.0, HOUR, AutoBounds(10, 1000, 0.05)).every == 1000


def test_a_run_that_keeps_failing_checkpoints_more_often() -> None:
    prior = 24 * HOUR
    assert mtbf_estimate(prior, 0.0, 0) == prior  # no history: the prior
    assert mtbf_estimate(prior, 2 * HOUR, 0) == 26 * HOUR  # trained 2 h without a failure
    assert mtbf_estimate(prior, 2 * HOUR, 1) == 13 * HOUR  # (24 + 2) / (1 + 1)
    assert mtbf_estimate(prior, 10 * HOUR, 5) == pytest.approx(34 / 6 * HOUR)
    every = [auto_interval(60.0, 2.0, mtbf_estimate(prior, 10 * HOUR, n), WIDE).every for n in range(4)]
    assert every == sorted(every, reverse=True) and len(set(every)) == 4


def test_a_new_decision_only_when_the_optimum_moves_more_than_a_fifth() -> None:
    assert optimum_moved(None, 100.0)  # the first measurement
    assert not optimum_moved(100.0, None)
    assert not optimum_moved(100.0, 119.0) and not optimum_moved(100.0, 81.0)
    assert optimum_moved(100.0, 121.0) and optimum_moved(100.0, 79.0)


def _journal(path: Path, events: list[tuple[str, int, str, dict]]) -> None:
    with Journal(path / "journal.jsonl") as journal:
        for event, step, _time, fields in events:
            record = journal.append(event, step, **fields)
            assert record["event"] == event
    # Journal stamps the current time: rewrite it so that the durations are known.
    lines = (path / "journal.jsonl").read_text().splitlines()
    stamped = [json.dumps({**json.loads(line), "time": e[2]}) for line, e in zip(lines, events, strict=True)]
    (path / "journal.jsonl").write_text("\n".join(stamped) + "\n")


def test_interruptions_are_read_from_the_journal(tmp_path: Path) -> None:
    t = "2026-01-01T00:{:02d}:00+00:00".format
    _journal(
        tmp_path,
        [
            ("run_start", 0, t(0), {}),
            ("save", 10, t(5), {"role": "recovery", "contents": "full", "seconds": 2.0}),
            # killed after its step 12 at minute 9; the next launch says so
            ("attempt_end", 12, t(20), {"last_step_time": t(9), "reason": "killed"}),
            ("run_start", 10, t(20), {}),
            ("preempt", 30, t(30), {"signal": "SIGTERM"}),
            ("run_start", 30, t(40), {}),
            ("save", 40, t(45), {"role": "recovery", "contents": "full", "seconds": 4.0}),
        ],
    )
    found = interruptions(json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines())
    # A kill and a preemption; 9 + 10 minutes of ended launches and 5 of the one still running.
    assert (found.count, found.training_seconds) == (2, 24 * 60.0)
    timing = timing_of(tmp_path, async_save=False, mtbf_hours=1.0)
    assert (timing.save_seconds, timing.interruptions) == (3.0, 2)
    assert timing.mtbf_seconds == pytest.approx((HOUR + 24 * 60) / 3)
    assert "checkpoint.mtbf_hours=1 as a prior, with 2 interruptions" in timing.mtbf_source


# ------------------------------------------------------------------------------------------------- config


def test_auto_cadences_in_the_config() -> None:
    cfg, _ = resolve(compose_config(["checkpoint.recovery_every=auto", "checkpoint.rollback_every=50"]))
    assert [r.value for r in cfg.checkpoint.auto_roles()] == ["recovery"]
    assert cfg.checkpoint.auto_bounds(cfg.train.steps) == AutoBounds(10, cfg.train.steps, 0.05)
    # Until the run decides, an auto role saves at its most frequent: the storage plan is an upper bound.
    policy = cfg.checkpoint.policy()
    assert isinstance(policy, Policy) and (policy.recovery_every, policy.rollback_every) == (10, 50)
    assert decide_save(policy, 10, "cadence") is not None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["checkpoint.recovery_every=often"],
            "checkpoint.recovery_every: must be an integer >= 0 (0 disables) or auto",
        ),
        (["checkpoint.auto_min_every=0"], "checkpoint.auto_min_every: must be >= 1"),
        (
            ["checkpoint.auto_min_every=20", "checkpoint.auto_max_every=10"],
            "checkpoint.auto_max_every: must be >= auto_min_every=20",
        ),
        (["checkpoint.max_overhead=0"], "checkpoint.max_overhead: must be a fraction"),
        (["checkpoint.mtbf_hours=0"], "checkpoint.mtbf_hours: must be > 0"),
        (["+debug.save_delay_s=-1"], "debug.save_delay_s"),
    ],
)
def test_bad_auto_settings_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(compose_config(overrides))


def test_auto_rollbacks_that_hold_parameters_only_are_refused_in_one_line_with_status_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "curry_train.train",
            "checkpoint.rollback_every=auto",
            "checkpoint.rollback_contents=params",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoint.rollback_every: auto" in lines[0] and "rollback_contents=full" in lines[0]
    assert not (tmp_path / "runs").exists()
