"""Time the harness's training step against a minimal hand-written FSDP2 step, side by side, and print the ratio.

    torchrun --standalone --nproc_per_node=2 scripts/bench_step.py --model small --steps 20 --rounds 3
    python scripts/bench_step.py --model tiny            # a world of one

Both variants train a model built by `distributed.build_sharded_model` (so the same initial weights) on the same list of
batches, fetched once before any timing (data loading is excluded from both). Each round times `--steps` steps of
one variant, then of the other, each after `--warmup` untimed steps; the order alternates between rounds so that
drift on a shared machine cancels. A step's time is the slowest rank's; the ratio compares medians over all rounds.

"harness" is what `loop.train` does per optimizer step: `step.optimizer_step` (lr schedule, `step.train_step`, the
loss all-reduce, the grad norm) and one metrics line through `MetricsLogger`. Evaluation, which the loop runs
every `train.eval_every` steps, is not part of a step and is left out.
"plain" is forward, cross-entropy, backward, `clip_grad_norm_`, `step`, `zero_grad`, and nothing else.

Extra positional arguments are Hydra overrides (e.g. `optimizer.lr=1e-3`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn

from curry_train import distributed
from curry_train import step as step_module
from curry_train.compose import resolve
from curry_train.config import Config, config_dir, validate
from curry_train.data import Slicing, build_train_loader, load_corpus
from curry_train.metrics import MetricsLogger
from curry_train.optim import build_optimizer

Batch = dict[str, torch.Tensor]
# The phases of the harness step, in order; each is timed on its own to explain a ratio above 1.
PHASES = ("optimizer_step", "metrics_log")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="model preset (conf/model/*.yaml)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant per round, before the timed ones")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="global sequences per step, across all ranks")
    p.add_argument("--max-bytes", type=int, default=4_000_000, help="corpus size to load (setup time only)")
    p.add_argument("--json", type=Path, default=None, help="write the numbers here (rank 0)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    return p.parse_args()


def compose_config(args: argparse.Namespace) -> Config:
    """The harness's own config, composed as `curry_train.train` does, with the benchmark's settings."""
    total_steps = args.rounds * (args.warmup + args.steps)
    overrides = [
        f"model={args.model}",
        f"data.seq_len={args.seq_len}",
        f"data.max_bytes={args.max_bytes}",
        f"train.batch_size={args.batch_size}",
        f"train.steps={total_steps}",  # the harness's schedule and step counter cover exactly the steps it takes
        "train.grad_accum=1",  # the plain step has no accumulation
        "train.eval_every=0",
        "train.device=cpu",
        "logger.wandb.mode=disabled",
        "logger.progress_bar=false",
        *args.overrides,
    ]
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        raw = compose("config", overrides=overrides)
    cfg, _ = resolve(raw)
    if cfg.train.grad_accum != 1:
        raise SystemExit("bench_step: the plain step has no gradient accumulation; keep train.grad_accum=1")
    return cfg


def prefetch_batches(cfg: Config, env: distributed.Dist, n: int) -> list[Batch]:
    """This rank's first `n` micro-batches from the harness's own loader."""
    corpus = load_corpus(cfg.data)
    slicing = Slicing(cfg.train.batch_size, env.world_size, env.rank, cfg.train.grad_accum)
    batches = iter(build_train_loader(corpus.train, cfg.data, slicing, cfg.train.seed))
    return [next(batches) for _ in range(n)]


# --- plain: a minimal hand-written FSDP2 step -------------------------------------------------------------------


def plain_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with the harness's hyperparameters (no weight decay on 1-D gains, as build_optimizer does)."""
    o = cfg.optimizer
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def make_plain_step(
    model: nn.Module, opt: torch.optim.Optimizer, grad_clip: float, device: torch.device
) -> Callable[[Batch], None]:
    def step(batch: Batch) -> None:
        x, y = batch["input"].to(device), batch["target"].to(device)
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# --- harness: loop.train's per-step body -------------------------------------------------------------------------


@dataclass
class Harness:
    """The state `loop.train` keeps across steps, and its per-step calls."""

    cfg: Config
    env: distributed.Dist
    model: nn.Module
    optimizer: torch.optim.Optimizer
    log: MetricsLogger
    step: int = 0
    # Seconds spent in each phase of every step taken (warmup included), for the breakdown.
    phases: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in PHASES})

    def run(self, batch: Batch) -> None:
        marks = [time.perf_counter()]
        values, _ = step_module.optimizer_step(
            self.step, self.model, self.optimizer, iter((batch,)), self.cfg, self.env.device
        )
        marks.append(time.perf_counter())
        values["tokens_per_s"] = self.cfg.train.batch_size * self.cfg.data.seq_len / (marks[1] - marks[0])
        self.log.log(self.step + 1, values)
        marks.append(time.perf_counter())
        self.step += 1
        for name, start, end in zip(PHASES, marks[:-1], marks[1:], strict=True):
            self.phases[name].append(end - start)


# --- timing ------------------------------------------------------------------------------------------------------


def time_block(step: Callable[[Batch], None], batches: Iterator[Batch], warmup: int, steps: int) -> list[float]:
    """`warmup` untimed steps, then the seconds of each of `steps` timed steps (barriers around the timed block)."""
    for _ in range(warmup):
        step(next(batches))
    dist.barrier()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(next(batches))
        times.append(time.perf_counter() - start)
    dist.barrier()
    return times


def slowest_rank(times: list[float]) -> list[float]:
    """Per step, the slowest rank's time: a step is done when every rank is done."""
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def run_rounds(
    variants: dict[str, Callable[[Batch], None]], batches: list[Batch], args: argparse.Namespace
) -> dict[str, list[float]]:
    """Interleaved rounds; each variant reads the same batch sequence from its own cursor."""
    cursors = {name: iter(batches) for name in variants}
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name] += time_block(variants[name], cursors[name], args.warmup, args.steps)
    return {name: slowest_rank(t) for name, t in times.items()}


def summarize(times: list[float], tokens_per_step: int) -> dict[str, float]:
    median = statistics.median(times)
    return {
        "median_s": median,
        "min_s": min(times),
        "mean_s": statistics.fmean(times),
        "tokens_per_s": tokens_per_step / median,
    }


def round_ratios(times: dict[str, list[float]], steps: int) -> list[float]:
    """harness/plain of each round's block medians: adjacent blocks, so slow drift cancels within a round."""
    h, p = times["harness"], times["plain"]
    blocks = range(0, len(h), steps)
    return [statistics.median(h[i : i + steps]) / statistics.median(p[i : i + steps]) for i in blocks]


# --- report ------------------------------------------------------------------------------------------------------


def phase_breakdown(harness: Harness, warmup: int, steps: int) -> dict[str, float]:
    """Median seconds of each harness phase over the timed steps (warmup steps dropped), slowest rank per step."""
    timed = [i for i in range(len(harness.phases["optimizer_step"])) if i % (warmup + steps) >= warmup]
    return {name: statistics.median(slowest_rank([harness.phases[name][i] for i in timed])) for name in PHASES}


def print_report(result: dict) -> None:
    print(
        f"torch {result['torch']}, world size {result['world_size']}, threads {result['threads']}, "
        f"model {result['model']} ({result['params']:,} params), seq_len {result['seq_len']}, "
        f"global batch {result['batch_size']}, {result['rounds']} rounds x {result['steps']} steps "
        f"(+{result['warmup']} warmup)"
    )
    print(f"{'variant':<10}{'median s/step':>15}{'min s/step':>13}{'mean s/step':>13}{'tokens/s':>12}")
    for name, s in result["variants"].items():
        print(f"{name:<10}{s['median_s']:>15.5f}{s['min_s']:>13.5f}{s['mean_s']:>13.5f}{s['tokens_per_s']:>12,.0f}")
    print("harness phases, median ms/step (slowest rank):")
    for name, seconds in result["harness_phases_s"].items():
        print(f"  {name:<16}{seconds * 1e3:>10.3f}")
    rounds = ", ".join(f"{r:.3f}" for r in result["round_ratios"])
    print(f"per-round harness/plain ratios: {rounds} (median {statistics.median(result['round_ratios']):.3f})")
    print(f"harness/plain ratio: {result['ratio']:.3f}")


def measure(args: argparse.Namespace, cfg: Config, env: distributed.Dist) -> dict:
    """The side-by-side timing on an initialised process group (also called by scripts/bench_checkpoint.py)."""
    validate(cfg, env.world_size)
    per_variant = args.rounds * (args.warmup + args.steps)
    batches = prefetch_batches(cfg, env, per_variant)

    plain_model, n_params = distributed.build_sharded_model(cfg, env)
    plain = make_plain_step(plain_model, plain_optimizer(plain_model, cfg), cfg.train.grad_clip, env.device)

    harness_model, _ = distributed.build_sharded_model(cfg, env)
    with tempfile.TemporaryDirectory(prefix="bench_step-") as run_dir:
        log = MetricsLogger(Path(run_dir), cfg.logger, cfg.train.steps, env.is_main, wandb_config=asdict(cfg))
        harness = Harness(cfg, env, harness_model, build_optimizer(harness_model, cfg.optimizer), log)
        times = run_rounds({"plain": plain, "harness": harness.run}, batches, args)
        log.close()
    phases = phase_breakdown(harness, args.warmup, args.steps)

    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    stats = {name: summarize(t, tokens_per_step) for name, t in times.items()}
    result = {
        "torch": torch.__version__,
        "world_size": env.world_size,
        "threads": torch.get_num_threads(),
        "model": cfg.model.name,
        "params": n_params,
        "seq_len": cfg.data.seq_len,
        "batch_size": cfg.train.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "variants": stats,
        "harness_phases_s": phases,
        "ratio": stats["harness"]["median_s"] / stats["plain"]["median_s"],
        "round_ratios": round_ratios(times, args.steps),
        "step_times_s": times,
    }
    return result


def main() -> None:
    args = parse_args()
    cfg = compose_config(args)
    env = distributed.init_distributed("cpu")
    try:
        result = measure(args, cfg, env)
        if env.is_main:
            print_report(result)
            if args.json:
                args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
