"""`checkpoint.*_every=auto` while training: decide the interval at the start of each launch (so after every resume)
and again whenever a newly committed save moves Daly's optimum by more than 20%, journal each decision as `cadence`,
and hand the checkpointer the policy it gives.

The inputs are read from the run directory (`history.timing_of`) and the interval computed by `plan.auto_decision`,
exactly as `curry-train plan` does, so every decision can be recomputed and explained afterwards. When saves happen
never changes what is trained: the trajectory, and exact resume, stay bitwise the same.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from curry_train import distributed
from curry_train.checkpoint.cadence import AutoInterval, optimum_moved, with_interval
from curry_train.checkpoint.checkpointer import Checkpointer
from curry_train.checkpoint.plan import auto_decision
from curry_train.checkpoint.policy import Policy
from curry_train.config import Config
from curry_train.history import timing_of
from curry_train.journal import Journal


class AutoCadence:
    """The automatic interval of a launch; does nothing (and costs no collective) when no cadence is `auto`."""

    def __init__(
        self, cfg: Config, run_dir: Path, journal: Journal, env: distributed.Dist, checkpointer: Checkpointer
    ) -> None:
        self.cfg = cfg
        self.roles = cfg.checkpoint.auto_roles()
        self.run_dir = run_dir
        self.journal = journal
        self.env = env
        self.checkpointer = checkpointer
        self.optimum: float | None = None  # the unclamped optimum of the decision in force
        self.seen_commits = checkpointer.commits

    def decide(self, step: int, reason: str, force: bool = True) -> Policy:
        """Decide now (every rank, at the same step) and return the policy in force.

        Saves are collective, so every rank must switch at the same step to the same interval: rank 0 alone reads
        the run directory and decides, and `on_rank0` gives every rank its decision (None: keep the interval)."""
        if self.roles:
            group = self.env.checkpoint_group
            decision = distributed.on_rank0(self.env.is_main, group, self._decide_on_rank0, step, reason, force)
            if decision is not None:
                self.optimum = decision.optimum_steps
                self.checkpointer.policy = with_interval(self.checkpointer.policy, self.roles, decision.every)
        return self.checkpointer.policy

    def follow(self, step: int) -> Policy:
        """After a step's saves: decide again when a save has committed since the last look. Every rank hears of a
        commit at the same step (the checkpointer's commit flags are all-reduced), so they call `decide` together."""
        if not self.roles or self.checkpointer.commits == self.seen_commits:
            return self.checkpointer.policy
        self.seen_commits = self.checkpointer.commits
        return self.decide(step, "a new save moved the optimum", force=False)

    def _decide_on_rank0(self, step: int, reason: str, force: bool) -> AutoInterval | None:
        c = self.cfg.checkpoint
        timing = timing_of(self.run_dir, c.async_save, c.mtbf_hours)
        decision = auto_decision(self.cfg, timing)
        if not force and not optimum_moved(self.optimum, decision.optimum_steps):
            return None
        bounds = c.auto_bounds(self.cfg.train.steps)
        fields: dict[str, Any] = {
            "every": decision.every,
            "reason": reason,
            "clamped": decision.clamped,
            "optimum_steps": decision.optimum_steps,
            **asdict(timing),
            **{f"auto_{k}" if k != "max_overhead" else k: v for k, v in asdict(bounds).items()},
        }
        for role in self.roles:
            self.journal.append("cadence", step, role=role, **fields)
        return decision
