"""The warmup-cosine schedule at its edges, and the optimizer's weight-decay groups."""

from __future__ import annotations

import math

import pytest
import torch

from curry_train.config import ModelConfig, OptimizerConfig, SchedulerConfig
from curry_train.model import build_model, init_value
from curry_train.optim import build_optimizer, lr_at, set_lr

PEAK = 3e-3


def schedule(steps: int, warmup: int, min_ratio: float = 0.1, name: str = "warmup_cosine") -> list[float]:
    cfg = SchedulerConfig(name=name, warmup_steps=warmup, min_lr_ratio=min_ratio)
    return [lr_at(s, PEAK, steps, cfg) for s in range(steps)]


def test_warmup_is_linear_from_peak_over_warmup_to_peak() -> None:
    lrs = schedule(steps=300, warmup=20)
    assert lrs[0] == pytest.approx(PEAK / 20)
    for s in range(20):
        assert lrs[s] == pytest.approx(PEAK * (s + 1) / 20)
    assert lrs[19] == pytest.approx(PEAK)  # end of warmup: the peak
    assert all(a < b for a, b in zip(lrs[:19], lrs[1:20], strict=True))


def test_cosine_decays_monotonically_to_min_lr_at_the_last_step() -> None:
    lrs = schedule(steps=300, warmup=20, min_ratio=0.1)
    assert lrs[20] == pytest.approx(PEAK)
    assert lrs[-1] == pytest.approx(0.1 * PEAK)
    after = lrs[19:]
    assert all(b <= a for a, b in zip(after, after[1:], strict=False))
    assert lrs[-2] > lrs[-1]  # still decaying into the last step, not flat before it
    assert all(0.1 * PEAK - 1e-12 <= lr <= PEAK + 1e-12 for lr in after)
    assert max(lrs) == pytest.approx(PEAK)


def test_cosine_midpoint_is_halfway_between_peak_and_min() -> None:
    steps, warmup = 111, 10  # 101 decay steps: progress 0.5 at step 60
    lrs = schedule(steps, warmup, min_ratio=0.2)
    assert lrs[60] == pytest.approx((PEAK + 0.2 * PEAK) / 2)


def test_after_the_last_step_the_lr_stays_at_min() -> None:
    cfg = SchedulerConfig(warmup_steps=5, min_lr_ratio=0.1)
    for step in (100, 101, 150, 1000):
        assert lr_at(step, PEAK, 100, cfg) == pytest.approx(0.1 * PEAK)


@pytest.mark.parametrize(("steps", "warmup"), [(10, 100), (10, 10), (10, 9), (2, 1), (1, 1), (1, 20)])
def test_warmup_as_long_as_or_longer_than_training(steps: int, warmup: int) -> None:
    lrs = schedule(steps, warmup)
    assert all(math.isfinite(lr) and 0 < lr <= PEAK * (1 + 1e-12) for lr in lrs)
    assert lrs[0] == pytest.approx(PEAK / warmup)
    assert all(b >= a for a, b in zip(lrs[:warmup], lrs[1:warmup], strict=False))


def test_no_warmup_starts_at_peak_and_ends_at_min() -> None:
    lrs = schedule(steps=50, warmup=0, min_ratio=0.0)
    assert lrs[0] == pytest.approx(PEAK)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-15)
    assert all(b <= a for a, b in zip(lrs, lrs[1:], strict=False))


@pytest.mark.parametrize("warmup", [0, 1])
def test_single_step_run(warmup: int) -> None:
    (lr,) = schedule(steps=1, warmup=warmup, min_ratio=0.1)
    assert math.isfinite(lr) and 0.1 * PEAK <= lr <= PEAK


def test_min_lr_ratio_one_is_flat_after_warmup() -> None:
    lrs = schedule(steps=40, warmup=4, min_ratio=1.0)
    assert all(lr == pytest.approx(PEAK) for lr in lrs[3:])


def test_constant_scheduler_is_the_peak_at_every_step() -> None:
    assert schedule(steps=30, warmup=10, name="constant") == [PEAK] * 30


# --- the optimizer -----------------------------------------------------------------------------------------------


def tiny_model() -> torch.nn.Module:
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, vocab_size=64, max_seq_len=16)
    model = build_model(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_value(name, p.shape, cfg, 0))
    model.reset_rotary()
    return model


def test_build_optimizer_exempts_1d_params_from_weight_decay() -> None:
    model = tiny_model()
    cfg = OptimizerConfig(lr=1e-2, betas=[0.8, 0.9], eps=1e-7, weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    by_id = {id(p): n for n, p in model.named_parameters()}
    decayed = [by_id[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]]
    exempt = [by_id[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]]
    params = dict(model.named_parameters())
    assert sorted(decayed + exempt) == sorted(params)  # every parameter exactly once
    assert exempt and all(params[n].ndim == 1 and n.endswith("norm.weight") for n in exempt)
    assert decayed and all(params[n].ndim == 2 for n in decayed)
    for g in opt.param_groups:
        assert g["lr"] == 1e-2 and tuple(g["betas"]) == (0.8, 0.9) and g["eps"] == 1e-7


def test_a_step_with_zero_gradients_decays_only_matrices() -> None:
    model = tiny_model()
    opt = build_optimizer(model, OptimizerConfig(lr=1e-2, weight_decay=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if p.ndim == 1:
            assert torch.equal(p, before[n]), n
        else:
            torch.testing.assert_close(p, before[n] * (1 - 1e-2 * 0.1), atol=1e-9, rtol=1e-6)


def test_set_lr_sets_every_group() -> None:
    opt = build_optimizer(tiny_model(), OptimizerConfig(lr=1e-2))
    set_lr(opt, 5e-4)
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 5e-4]
