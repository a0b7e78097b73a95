"""Loss-spike detection and the bookkeeping of rollbacks: pure functions of the loss history, stdlib only.

Every rank sees the same all-reduced loss, so every rank reaches the same verdict with no extra collective. The
baseline is robust: the median of the last `window` losses and their median absolute deviation (MAD, scaled by
1.4826 to estimate a standard deviation), so one earlier outlier neither hides a spike nor causes one. A loss is a
spike when it is not finite, or when it exceeds the median by more than `sigmas` deviations AND by more than
`min_rise` of the median: the second condition keeps a very flat window (MAD near 0) from calling noise a spike.
Detection is armed only after `warmup_steps` and once the window is full: early training falls fast and noisily.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


@dataclass(frozen=True)
class SpikeRule:
    window: int = 50
    warmup_steps: int = 100
    sigmas: float = 6.0
    min_rise: float = 0.1

    def __post_init__(self) -> None:
        if self.window < 3:
            raise ValueError(f"spike.window={self.window}: needs at least 3 steps for a median and a deviation")
        if self.warmup_steps < 0:
            raise ValueError(f"spike.warmup_steps={self.warmup_steps}: must be >= 0")
        if not self.sigmas > 0:
            raise ValueError(f"spike.sigmas={self.sigmas}: must be > 0")
        if not self.min_rise >= 0:
            raise ValueError(f"spike.min_rise={self.min_rise}: must be >= 0")


@dataclass(frozen=True)
class Verdict:
    spike: bool
    loss: float
    baseline: float | None  # the window's median, when armed
    threshold: float | None  # the loss above which a step is a spike, when armed
    reason: str


def judge(rule: SpikeRule, window: list[float], step: int, loss: float) -> Verdict:
    """Whether the loss of completed step `step` is a spike against the `window` of losses before it."""
    if not math.isfinite(loss):
        return Verdict(True, loss, None, None, f"loss {loss} at step {step} is not finite")
    if step <= rule.warmup_steps or len(window) < rule.window:
        return Verdict(False, loss, None, None, "not armed yet")
    median = statistics.median(window)
    deviation = MAD_TO_SIGMA * statistics.median(abs(x - median) for x in window)
    threshold = median + max(rule.sigmas * deviation, rule.min_rise * abs(median))
    if loss > threshold:
        reason = (
            f"loss {loss:.4f} at step {step} is above {threshold:.4f}: the baseline {median:.4f} (median of the "
            f"last {rule.window} steps) plus max({rule.sigmas:g} x {deviation:.4f}, {rule.min_rise:.0%} of it)"
        )
        return Verdict(True, loss, median, threshold, reason)
    return Verdict(False, loss, median, threshold, "within the baseline")


def push(window: list[float], loss: float, size: int) -> list[float]:
    """The window after a normal step: the newest `size` losses."""
    return [*window, loss][-size:]


def rollback_bound(spike_step: int, rule: SpikeRule, margin: int) -> int:
    """The newest step a rollback may return to: before the baseline window began (the spike may have been
    building inside it), less `margin` more steps."""
    return spike_step - rule.window - margin


def recent_rollbacks(spike_steps: list[int], step: int, within: int) -> int:
    """How many of the rollbacks (by the step each spike was seen at) fell in the last `within` steps."""
    return sum(1 for s in spike_steps if step - within < s <= step)


def rewarm_factor(step: int, rewarm_from: int | None, rewarmup_steps: int) -> float:
    """The lr multiplier for 0-based step `step` after the optimizer state started fresh at `rewarm_from`:
    Adam's moments are empty, so the first updates are as large as the lr allows; ramp it up linearly again."""
    if rewarm_from is None or rewarmup_steps <= 0 or step < rewarm_from:
        return 1.0
    return min(1.0, (step - rewarm_from + 1) / rewarmup_steps)
