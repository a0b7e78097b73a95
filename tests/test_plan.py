"""`curry-train plan`: storage arithmetic, worst-case resume points, Young/Daly, and estimates against real
checkpoints written by the training entry point."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from curry_train.checkpoint.cadence import (
    Timing,
    cadence,
    crash_target,
    daly_interval,
    spike_target,
    wasted_fraction,
    young_interval,
)
from curry_train.checkpoint.pending import PendingSave
from curry_train.checkpoint.policy import Contents, Policy
from curry_train.checkpoint.sizes import ModelSize, checkpoint_size
from curry_train.checkpoint.store import RunDir
from curry_train.cli import main
from curry_train.history import measured_save_seconds, measured_step_seconds, save_costs
from curry_train.journal import Journal
from curry_train.units import human_bytes
from tests.conftest import FAST, only_run_dir, run_train

P_7B = 6_738_415_616
DAY = 86_400.0


def plan_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["plan", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------------------------- Young/Daly


def test_young_and_daly_against_hand_computed_values() -> None:
    # C = 60 s, M = 24 h: Young sqrt(2 * 60 * 86400) = sqrt(10,368,000) = 3219.94 s.
    assert young_interval(60, DAY) == pytest.approx(3219.9379, abs=1e-3)
    # Daly: r = C / 2M = 60 / 172800 = 3.4722e-4, sqrt(r) = 0.0186339;
    # 3219.9379 * (1 + 0.0186339 / 3 + 3.4722e-4 / 9) - 60 = 3219.9379 * 1.0062499 - 60 = 3180.06 s.
    assert daly_interval(60, DAY) == pytest.approx(3180.06, abs=0.01)
    # C >= 2M: checkpointing cannot pay off within a failure interval; Daly's answer is M itself.
    assert daly_interval(7200, 3600) == 3600
    # C / T + (T + C) / 2M at T = 1 h: 60 / 3600 + 3660 / 172800 = 0.0166667 + 0.0211806 = 0.0378472.
    assert wasted_fraction(3600, 60, DAY) == pytest.approx(0.0378472, abs=1e-7)


def test_young_interval_minimises_the_first_order_waste() -> None:
    best = young_interval(60, DAY)
    for other in (0.5 * best, 0.9 * best, 1.1 * best, 2 * best):
        assert wasted_fraction(best, 60, DAY) < wasted_fraction(other, 60, DAY)


def test_cadence_in_steps_configured_versus_optimum() -> None:
    policy = Policy(rollback_every=100, recovery_every=1000)
    timing = Timing(60.0, "given", 2.0, "given", DAY, "given")
    c = cadence(policy, timing)
    assert c is not None
    assert c.optimum_steps == 1590  # 3180.06 s / 2 s
    assert (c.configured_steps, c.configured_role) == (100, "rollback")
    # Every 100 steps = 200 s: 60 / 200 + 260 / 172800 = 0.30150.
    assert c.wasted_configured == pytest.approx(0.30150, abs=1e-5)
    assert c.wasted_optimum == pytest.approx(60 / 3180.06 + 3240.06 / 172800, abs=1e-6)
    # Parameters-only rollbacks cannot resume a crash: the recovery cadence is the one Young/Daly judges.
    lighter = cadence(Policy(rollback_every=100, recovery_every=1000, rollback_contents="params"), timing)
    assert lighter is not None and (lighter.configured_steps, lighter.configured_role) == (1000, "recovery")
    assert cadence(policy, Timing(None, "", 2.0, "", DAY, "")) is None


# --------------------------------------------------------------------------------------------- measurements


def test_save_and_step_times_are_measured_from_the_run_directory(tmp_path: Path) -> None:
    with Journal(tmp_path / "journal.jsonl") as journal:
        journal.append("save", 10, role="rollback", seconds=5.0, blocking_seconds=1.0, contents="full")
        journal.append("save", 10, role="rollback", seconds=0.0, linked_from="recovery/x", contents="full")
        journal.append("save", 20, role="rollback", seconds=7.0, blocking_seconds=3.0, contents="full")
        journal.append("save", 20, role="best_k", seconds=1.0, blocking_seconds=0.1, contents="params")
    assert measured_save_seconds(tmp_path, async_save=False) == (6.0, 2)
    assert measured_save_seconds(tmp_path, async_save=True) == (2.0, 2)
    # Steps 1-4 two seconds apart, then a resume from step 2 an hour later: only n -> n+1 pairs count.
    lines = [(1, 0.0), (2, 2.0), (3, 4.0), (4, 6.0), (3, 3600.0), (4, 3602.5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "time": t}) + "\n" for s, t in lines))
    assert measured_step_seconds(tmp_path) == (2.0, 4)


def test_an_async_save_costs_at_least_what_it_blocked_though_its_journaled_estimate_may_be_lower(
    tmp_path: Path,
) -> None:
    # The journal keeps each save's estimate unclamped (so means over saves are unbiased); the plan reads at least
    # the blocked time.
    with Journal(tmp_path / "journal.jsonl") as journal:
        for step, cost in ((10, -0.2), (20, 0.05), (30, 0.9)):
            journal.append("save", step, role="rollback", seconds=3.0, blocking_seconds=0.1, cost_seconds=cost)
    assert save_costs(tmp_path, async_save=True) == [0.1, 0.1, 0.9]
    assert measured_save_seconds(tmp_path, async_save=True) == (0.1, 3)


def test_a_saves_journaled_cost_is_not_clamped_so_noise_averages_out() -> None:
    pending = PendingSave(checkpoints=[], contents=Contents.FULL, started=0.0, blocking_seconds=0.02)
    pending.overlapped, pending.baseline = [1.9], 2.0  # the step it overlapped ran faster than the median step
    assert pending.costs(now=0.0) == (0.02, pytest.approx(-0.08))
    pending.overlapped = [2.1, 2.05]
    assert pending.costs(now=0.0) == (0.02, pytest.approx(0.17))


# ------------------------------------------------------------------------------------ worst-case resume point

SMALL_POLICY = Policy(rollback_every=10, recovery_every=25, rollback_keep=2, recovery_keep=1)


@pytest.mark.parametrize(
    ("policy", "step", "crash", "spike"),
    [
        # Saves before 57: rollback 50, 40; recovery 50 (written once; the rollback is its hard link).
        (SMALL_POLICY, 57, ("recovery/step-00000050.dcp", 7), ("recovery/step-00000050.dcp", 7)),
        # The save due at 50 is the one the crash interrupts: rollback 40 is the newest before it.
        (SMALL_POLICY, 50, ("rollback/step-00000040.dcp", 10), ("rollback/step-00000040.dcp", 10)),
        (SMALL_POLICY, 5, (None, 5), (None, 5)),
        # Parameters-only rollbacks still serve a spike, but a crash needs recovery's full state.
        (
            Policy(rollback_every=10, recovery_every=25, rollback_contents="params"),
            49,
            ("recovery/step-00000025.dcp", 24),
            ("rollback/step-00000040.dcp", 9),
        ),
    ],
)
def test_worst_case_for_a_crash_and_a_spike(
    policy: Policy, step: int, crash: tuple[str | None, int], spike: tuple[str | None, int]
) -> None:
    assert (crash_target(policy, step).relpath, crash_target(policy, step).steps_lost) == crash
    assert (spike_target(policy, step).relpath, spike_target(policy, step).steps_lost) == spike


@pytest.mark.parametrize(
    ("policy", "crash_step", "expected"),
    [
        (Policy(rollback_every=100, recovery_every=1000), 0, 0),
        (Policy(rollback_every=100, recovery_every=1000), 1, 0),
        (Policy(rollback_every=100, recovery_every=1000), 100, 0),  # the save at 100 had not committed
        (Policy(rollback_every=100, recovery_every=1000), 101, 100),
        (Policy(rollback_every=100, recovery_every=1000), 1000, 900),
        (Policy(rollback_every=100, recovery_every=1000), 1050, 1000),
        (Policy(rollback_every=100, recovery_every=1000, rollback_contents="params"), 1999, 1000),
        (Policy(rollback_every=100, recovery_every=1000, rollback_contents="params"), 999, 0),
        (Policy(rollback_every=0, recovery_every=0), 5000, 0),
        (Policy(rollback_every=300, recovery_every=500), 1000, 900),
    ],
)
def test_crash_target_step(policy: Policy, crash_step: int, expected: int) -> None:
    assert crash_target(policy, crash_step).step == expected


def test_crash_target_rejects_a_negative_step() -> None:
    with pytest.raises(ValueError, match="crash step"):
        crash_target(Policy(), -1)


@pytest.mark.parametrize("contents", ["full", "params"])
def test_crash_target_is_the_last_exact_resume_save_before_the_crash(contents: str) -> None:
    # Closed form, with the smallest keeps: the last multiple, strictly below the crash step, of each cadence whose
    # saves hold full state (recovery every 25; rollback every 10 when it holds full state).
    policy = Policy(rollback_every=10, recovery_every=25, rollback_keep=1, recovery_keep=1, rollback_contents=contents)
    cadences = [25, 10] if contents == "full" else [25]
    for t in range(200):
        expected = max((t - 1) // every * every for every in cadences) if t > 0 else 0
        assert crash_target(policy, t).step == expected, t


def test_async_crash_falls_back_to_the_save_before() -> None:
    # The step-50 save (recovery + its rollback link) may still be in flight at 57: the one before is step 40.
    assert crash_target(SMALL_POLICY, 57, async_save=True).fallback_step == 40


def test_plan_command_reports_the_worst_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = ["checkpoint.rollback_every=10", "checkpoint.recovery_every=25", "checkpoint.retention.rollback_keep=2"]
    data = plan_json(capsys, "--at-step", "57", f"run.root={tmp_path}", *overrides)
    assert data["worst_case_resume_step"] == 50
    assert data["crash"]["relpath"] == "recovery/step-00000050.dcp" and data["crash"]["steps_lost"] == 7
    assert data["spike"]["step"] == 50


# ------------------------------------------------------------------------------------------ 7B storage numbers


def test_twelve_bytes_per_parameter_for_a_full_checkpoint() -> None:
    size = checkpoint_size(ModelSize(7_000_000_000, 0), full=True)
    assert size.params_bytes + size.optimizer_bytes == 84_000_000_000


def test_7b_plan_json(tmp_path: Path) -> None:
    # The console entry point, as a user runs it.
    # A long run: train.steps (default 200) caps how many checkpoints each role can make.
    args = ["plan", "model=7b", "checkpoint=7b_default", "train.steps=100000", "--json", "--at-step", "2500"]
    proc = subprocess.run(
        [sys.executable, "-m", "curry_train.cli", *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["params"] == P_7B
    full, params_only = data["bytes_per_checkpoint"]["recovery"], data["bytes_per_checkpoint"]["best_k"]
    assert data["bytes_per_checkpoint"]["rollback"] == full
    assert 80.8e9 < full < 81.0e9  # 12 B/param: 80.86 GB, plus a few MB of extras
    assert 26.9e9 < params_only < 27.0e9  # 4 B/param
    # 5 rollback + 3 recovery full, 3 best-K parameters-only, 1 full set aside by a rollback (abandoned_keep), one
    # full save in flight (async): 889.5 GB.
    assert data["committed_bytes"] == 10 * full + 3 * params_only
    assert 889e9 < data["committed_bytes"] < 890e9
    assert data["all_full_bytes"] == 12 * full  # 970.4 GB
    assert data["free_bytes"] > 0 and data["fits"] == (data["committed_bytes"] <= data["free_bytes"])
    assert data["worst_case_resume_step"] == 2400
    assert data["recommendation"]["saved_bytes"] == 5 * (full - params_only)


def test_7b_text_recommends_parameters_only_rollbacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    long_run = ["model=7b", "checkpoint=7b_default", "train.steps=100000", f"run.root={tmp_path}"]
    data = plan_json(capsys, *long_run)
    assert main(["plan", *long_run]) == 0
    text = capsys.readouterr().out
    full, params_only = data["bytes_per_checkpoint"]["recovery"], data["bytes_per_checkpoint"]["best_k"]
    assert "checkpoint.rollback_contents=params" in text
    assert f"saves {human_bytes(5 * (full - params_only))}" in text
    assert "12 full checkpoints would be 970.4 GB" in text
    assert "grows from 100 to 1000 steps" in text


def test_a_short_run_budgets_only_the_checkpoints_it_can_make(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 200 steps at rollback 100 / recovery 1000, evaluating every 100: 2 rollback, 0 recovery, 2 best-K.
    short = ["model=7b", "checkpoint=7b_default", "train.steps=200", "train.eval_every=100", f"run.root={tmp_path}"]
    data = plan_json(capsys, *short)
    roles = data["roles"]
    assert (roles["rollback"]["kept"], roles["recovery"]["kept"], roles["best_k"]["kept"]) == (2, 0, 2)
    full, params_only = data["bytes_per_checkpoint"]["recovery"], data["bytes_per_checkpoint"]["best_k"]
    # Plus one full checkpoint a rollback may set aside (abandoned_keep=1), and one full save in flight.
    assert roles["set_aside"]["kept"] == 1
    assert data["committed_bytes"] == 2 * full + 2 * params_only + full + full
    assert data["warnings"] == [
        "checkpoint.recovery_every=1000 exceeds train.steps=200: this run makes no recovery checkpoint"
    ]
    assert main(["plan", *short]) == 0
    text = capsys.readouterr().out
    assert "keep 2 of 5" in text and "keep 0 of 3" in text
    assert "WARNING: checkpoint.recovery_every=1000 exceeds train.steps=200" in text
    # Training's advice names no option that only `curry-train plan` takes as if training took it.
    assert "give --save-seconds" not in text and "`curry-train plan` with the same overrides" in text


def test_a_run_too_short_for_any_save_warns_per_role_and_renders(capsys: pytest.CaptureFixture[str]) -> None:
    # train.steps=1 at the default cadences makes no checkpoint at all; the set-aside row (a flag, not a
    # cadence) must not be reported as one, and the text plan (which training prints at start) must render.
    data = plan_json(capsys, "train.steps=1")
    assert data["warnings"] == [
        "checkpoint.rollback_every=100 exceeds train.steps=1: this run makes no rollback checkpoint",
        "checkpoint.recovery_every=200 exceeds train.steps=1: this run makes no recovery checkpoint",
        "no checkpoint with full state within the run: a crash restarts it from step 0",
    ]
    assert main(["plan", "train.steps=1"]) == 0
    assert "WARNING: no checkpoint with full state" in capsys.readouterr().out


def test_a_policy_that_does_not_fit_is_flagged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 10^7 x 11.4 MB = 114 TB, over a run long enough to make them.
    huge = ["checkpoint.retention.rollback_keep=10000000", "train.steps=1000000000", f"run.root={tmp_path}"]
    data = plan_json(capsys, *huge)
    assert data["fits"] is False and data["committed_bytes"] > data["free_bytes"]
    assert main(["plan", *huge]) == 0
    text = capsys.readouterr().out
    assert "WARNING: the policy does not fit" in text and "training will refuse to start" in text
    assert main(["plan", *huge, "checkpoint.check_storage=false"]) == 0
    assert "will start anyway" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "named"),
    [("checkpoint.rollback_every=-1", "checkpoint.rollback_every"), ("checkpoint.rollback_evry=5", "rollback_evry")],
)
def test_config_error_exits_2_naming_the_key(override: str, named: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", override]) == 2
    err = capsys.readouterr().err
    assert "invalid config" in err and named in err


# ------------------------------------------------------------------------------ estimates against real checkpoints


def disk_bytes(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _dirs, files in os.walk(path) for f in files)


@pytest.mark.parametrize(
    ("model", "settings", "roles"),
    [
        # Recoveries at 2 and 4, a parameters-only rollback at 3, a best-K at 5. (A best-K at a step with a
        # cadence save is hard links of that save, and says nothing about the size of a best-K write.)
        (
            "tiny",
            [
                "train.steps=5",
                "train.eval_every=5",
                "checkpoint.rollback_every=3",
                "checkpoint.recovery_every=2",
                "checkpoint.rollback_contents=params",
                "checkpoint.best_k=1",
            ],
            {"rollback", "recovery", "best-k"},
        ),
        # ~57M parameters: a parameters-only best-K at step 1, a full recovery at step 2 (a full rollback is the same
        # size; the best-K of step 2 is hard links of the recovery).
        (
            "small",
            [
                "train.steps=2",
                "train.eval_every=1",
                "checkpoint.rollback_every=0",
                "checkpoint.recovery_every=2",
                "checkpoint.best_k=2",
            ],
            {"recovery", "best-k"},
        ),
    ],
)
def test_estimate_within_5_percent_of_real_checkpoints(
    model: str, settings: list[str], roles: set[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = [*FAST, f"model={model}", *settings, f"run.root={tmp_path / 'runs'}"]
    run_train(overrides, tmp_path)
    run_dir = only_run_dir(tmp_path / "runs")
    data = plan_json(capsys, *overrides)
    assert Path(data["run_dir"]) == run_dir  # the plan names the run directory training used
    store = RunDir(run_dir)
    ratios = {
        ckpt.relpath: data["bytes_per_checkpoint"][ckpt.role.value] / disk_bytes(store.path_of(ckpt))
        for ckpt in store.list()
        if store.manifest(ckpt).linked_from is None  # a hard link shares the bytes of the save it links to
    }
    print(model, ratios)
    assert {path.split("/")[0] for path in ratios} == roles
    assert all(math.isclose(r, 1.0, abs_tol=0.05) for r in ratios.values()), ratios
    # The run's own journal supplies the save time of the cadence.
    assert data["timing"]["save_source"].startswith("median of")


def test_plan_of_a_7b_model_imports_neither_torch_nor_numpy(tmp_path: Path) -> None:
    # `curry-train plan` counts parameters from the config (model_shapes) and builds no model: importing torch and
    # its meta kernels was most of its start-up time. `prepare`'s numpy and tokenizers load only for `prepare`.
    probe = (
        "import sys; from curry_train.cli import main\n"
        f"assert main(['plan', 'model=7b', 'checkpoint=7b_default', 'run.root={tmp_path}']) == 0\n"
        "print(sorted(m for m in ('torch', 'numpy', 'tokenizers', 'wandb') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "6,738,415,616 parameters" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_the_plan_warns_when_a_full_save_outlasts_the_preemption_grace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "slow"
    run_dir.mkdir()
    with Journal(run_dir / "journal.jsonl") as journal:
        journal.append("save", 10, role="recovery", seconds=50.0, blocking_seconds=1.0, contents="full")
    args = [f"run.root={tmp_path}", "run.id=slow", "checkpoint.preempt_grace_s=30"]
    assert main(["plan", *args]) == 0
    text = capsys.readouterr().out
    assert "a full save took 50 s in this run, more than checkpoint.preempt_grace_s=30" in text
    assert main(["plan", *args[:-1], "checkpoint.preempt_grace_s=60"]) == 0
    assert "preempt_grace_s" not in capsys.readouterr().out


def test_the_plan_counts_the_local_copies_that_wait_for_upload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With checkpoint.remote, each remote role's upload lane holds one save's files until uploaded."""
    base = ["plan", "model=7b", "checkpoint=7b_default", "train.steps=100000", "--json"]
    assert main(base) == 0
    without = json.loads(capsys.readouterr().out)
    assert main([*base, "checkpoint.remote=s3://bucket/runs"]) == 0
    remote = json.loads(capsys.readouterr().out)
    full, params_only = without["bytes_per_checkpoint"]["recovery"], without["bytes_per_checkpoint"]["best_k"]
    assert without["awaiting_upload_bytes"] == 0
    assert remote["awaiting_upload_bytes"] == full + params_only  # the default remote roles: recovery and best-K
    assert remote["committed_bytes"] == without["committed_bytes"] + full + params_only
