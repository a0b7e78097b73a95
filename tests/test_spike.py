"""Spike detection and rollback bookkeeping: pure functions, no torch."""

from __future__ import annotations

import math

import pytest

from curry_train.spike import SpikeRule, judge, push, recent_rollbacks, rewarm_factor, rollback_bound

RULE = SpikeRule(window=8, warmup_steps=10, sigmas=6.0, min_rise=0.1)
FLAT = [2.50, 2.52, 2.48, 2.51, 2.49, 2.50, 2.53, 2.47]


def test_a_loss_well_above_the_robust_baseline_is_a_spike() -> None:
    verdict = judge(RULE, FLAT, 30, 4.0)
    assert verdict.spike and verdict.baseline == pytest.approx(2.50)
    assert verdict.threshold is not None and 2.5 < verdict.threshold < 4.0
    assert "step 30" in verdict.reason and "median of the last 8 steps" in verdict.reason


def test_noise_and_a_falling_loss_are_not_spikes() -> None:
    assert not judge(RULE, FLAT, 30, 2.56).spike
    assert not judge(RULE, FLAT, 30, 1.0).spike


def test_min_rise_guards_a_flat_window() -> None:
    # A window with no spread at all: 6 x MAD is 0, so without min_rise any uptick would be a spike.
    flat = [2.5] * 8
    assert not judge(RULE, flat, 30, 2.7).spike  # +8% < 10%
    assert judge(RULE, flat, 30, 2.8).spike  # +12%


def test_one_old_outlier_does_not_move_a_median_baseline() -> None:
    window = [*FLAT[:-1], 40.0]
    assert judge(RULE, window, 30, 4.0).spike


def test_detection_is_armed_only_after_warmup_and_a_full_window() -> None:
    assert not judge(RULE, FLAT, 10, 100.0).spike  # warmup_steps=10: step 10 is still warmup
    assert not judge(RULE, FLAT[:5], 30, 100.0).spike  # window not full yet
    assert judge(RULE, FLAT, 11, 100.0).spike


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_a_non_finite_loss_is_always_a_spike(loss: float) -> None:
    assert judge(RULE, [], 1, loss).spike


def test_push_keeps_the_newest_window() -> None:
    window: list[float] = []
    for x in range(12):
        window = push(window, float(x), 8)
    assert window == [float(x) for x in range(4, 12)]


def test_rollback_bound_lies_before_the_window_and_the_margin() -> None:
    assert rollback_bound(26, RULE, 0) == 18
    assert rollback_bound(26, RULE, 5) == 13


def test_recent_rollbacks_counts_only_the_window() -> None:
    assert recent_rollbacks([100, 500, 900], 1000, 1000) == 3
    assert recent_rollbacks([100, 500, 900], 1100, 1000) == 2  # step 100 is 1000 steps ago: outside


def test_rewarm_ramps_the_lr_after_a_fresh_optimizer() -> None:
    assert rewarm_factor(50, None, 20) == 1.0
    assert rewarm_factor(15, 15, 20) == pytest.approx(1 / 20)  # the first step after the rollback to step 15
    assert rewarm_factor(34, 15, 20) == 1.0
    assert rewarm_factor(20, 15, 0) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"window": 2}, "spike.window"), ({"sigmas": 0}, "spike.sigmas"), ({"min_rise": -1}, "spike.min_rise")],
)
def test_a_bad_rule_names_its_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        SpikeRule(**kwargs)
