"""`checkpoint.recovery_every=auto` on 2 real ranks: three launches shared by every check. A straight run; the same
run with saves made slower by +debug.save_delay_s, SIGKILLed after 20 steps and resumed with +resume=latest."""

from __future__ import annotations

import importlib.util
import json
import statistics
import time
from pathlib import Path

import pytest

from curry_train.checkpoint.cadence import AutoBounds, auto_interval, daly_interval, mtbf_estimate
from curry_train.cli import main
from curry_train.journal import read_journal
from curry_train.metrics import read_metrics
from tests.conftest import FAST, popen_train, run_train

REPO = Path(__file__).resolve().parents[1]
STEPS = 40
# A tiny prior MTBF (7.2 s) puts Daly's optimum at a few to a few tens of steps of this small model; the bounds are
# wide, so that the optimum itself shows.
AUTO = [
    *FAST,
    f"train.steps={STEPS}",
    "train.eval_every=0",
    "checkpoint.best_k=0",
    "checkpoint.rollback_every=0",
    "checkpoint.recovery_every=auto",
    "checkpoint.auto_min_every=2",
    "checkpoint.auto_max_every=1000",
    "checkpoint.mtbf_hours=0.002",
    "checkpoint.max_overhead=0.5",
]
SLOW = ["+debug.save_delay_s=1.0"]


def _kill_tree(pid: int) -> None:
    spec = importlib.util.spec_from_file_location("kill_and_resume", REPO / "scripts" / "kill_and_resume.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.kill_tree(pid)


def cadences(run_dir: Path) -> list[dict]:
    return [e for e in read_journal(run_dir / "journal.jsonl") if e["event"] == "cadence"]


def recomputed(e: dict):
    bounds = AutoBounds(e["auto_min_every"], e["auto_max_every"], e["max_overhead"])
    return auto_interval(e["save_seconds"], e["step_seconds"], e["mtbf_seconds"], bounds)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("auto-cadence")
    run_train([*AUTO, f"run.root={root}", "run.id=straight"], root, nproc=2)
    slow = root / "slow"
    job = popen_train([*AUTO, *SLOW, f"run.root={root}", "run.id=slow"], root, nproc=2)
    deadline = time.monotonic() + 300
    try:
        while job.poll() is None and time.monotonic() < deadline:
            measured = (slow / "journal.jsonl").exists() and any(e["optimum_steps"] for e in cadences(slow))
            if measured and max(read_metrics(slow / "metrics.jsonl"), default=0) >= 20:
                break
            time.sleep(0.05)
    finally:
        _kill_tree(job.pid)
        job.communicate(timeout=60)
    assert job.returncode == -9, "the slow run ended before it could be killed"
    run_train([*AUTO, *SLOW, f"run.root={root}", "run.id=slow", "+resume=latest"], root, nproc=2)
    return root / "straight", slow


def test_each_decision_is_dalys_interval_on_its_own_inputs(runs: tuple[Path, Path]) -> None:
    straight, slow = runs
    for run_dir in (straight, slow):
        events = read_journal(run_dir / "journal.jsonl")
        decisions = [e for e in events if e["event"] == "cadence"]
        assert decisions[0]["reason"] == "start" and decisions[0]["step"] == 0
        # Before anything is measured, the first save comes early, at the minimum.
        assert (decisions[0]["every"], decisions[0]["clamped"], decisions[0]["optimum_steps"]) == (2, "min", None)
        measured = [e for e in decisions if e["optimum_steps"] is not None]
        assert measured, f"no decision from measured inputs in {run_dir.name}"
        for e in measured:
            assert e["role"] == "recovery"
            assert e["optimum_steps"] == pytest.approx(
                daly_interval(e["save_seconds"], e["mtbf_seconds"]) / e["step_seconds"]
            )
            again = recomputed(e)
            assert (e["every"], e["clamped"]) == (again.every, again.clamped), e
            if e["clamped"] is None:
                assert e["every"] == max(1, round(e["optimum_steps"]))
            # The save cost is what the run directory held: the median cost of the newest full saves before it,
            # each at least the time it blocked training.
            before = events[: events.index(e)]
            costs = [max(s["cost_seconds"] or 0.0, s["blocking_seconds"]) for s in before if s["event"] == "save"]
            assert e["save_seconds"] == pytest.approx(statistics.median(costs[-5:]))
    assert any(e["clamped"] is None for e in cadences(straight) if e["optimum_steps"] is not None)


def test_recovery_saves_follow_the_interval_in_force(runs: tuple[Path, Path]) -> None:
    straight, _ = runs
    events = read_journal(straight / "journal.jsonl")
    decisions = [e for e in events if e["event"] == "cadence"]
    saved = sorted(e["step"] for e in events if e["event"] == "save" and e["role"] == "recovery")
    # A decision after step d's saves governs the saves after d, up to the next decision.
    expected = set()
    for e, following in zip(decisions, [*decisions[1:], None], strict=True):
        end = following["step"] if following else STEPS
        expected |= {s for s in range(e["step"] + 1, end + 1) if s % e["every"] == 0}
    assert set(saved) == expected | {STEPS}, (saved, [(e["step"], e["every"]) for e in decisions])
    assert max(e["every"] for e in decisions) > 2, "the interval never moved from its first, early value"


def test_slower_saves_get_a_longer_interval(runs: tuple[Path, Path]) -> None:
    straight, slow = runs
    first = {r.name: next(e for e in cadences(r) if e["optimum_steps"] is not None) for r in runs}
    assert first["slow"]["save_seconds"] >= 1.0  # +debug.save_delay_s is part of what a save costs training
    assert first["slow"]["save_seconds"] > 2 * first["straight"]["save_seconds"]
    assert first["slow"]["every"] > first["straight"]["every"], (first["slow"], first["straight"])


def test_a_kill_counts_as_a_failure_and_shortens_the_interval(runs: tuple[Path, Path]) -> None:
    straight, slow = runs
    resumed = next(e for e in cadences(slow) if e["reason"] == "resume")
    assert resumed["interruptions"] == 1 and "1 interruption" in resumed["mtbf_source"]
    prior, trained = resumed["mtbf_prior_seconds"], resumed["training_seconds"]
    assert resumed["mtbf_seconds"] == pytest.approx(mtbf_estimate(prior, trained, 1))
    # The same inputs without the kill: the interval would be longer.
    unfailed = recomputed({**resumed, "mtbf_seconds": mtbf_estimate(prior, trained, 0)})
    assert resumed["every"] < unfailed.every, (resumed, unfailed)
    # When saves happen never changes what is trained: the resumed run's losses are the straight run's, bitwise.
    ours, theirs = read_metrics(slow / "metrics.jsonl"), read_metrics(straight / "metrics.jsonl")
    assert sorted(ours) == sorted(theirs) == list(range(1, STEPS + 1))
    assert [ours[s]["loss"] for s in ours] == [theirs[s]["loss"] for s in ours]


def test_plan_and_status_show_the_decision(runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, slow = runs
    assert main(["plan", "--json", *AUTO, f"run.root={slow.parent}", "run.id=slow"]) == 0
    plan = json.loads(capsys.readouterr().out)
    t = plan["timing"]
    assert t["interruptions"] == 1 and t["save_seconds"] >= 1.0
    bounds = AutoBounds(2, 1000, 0.5)
    expected = auto_interval(t["save_seconds"], t["step_seconds"], t["mtbf_seconds"], bounds)
    assert (plan["auto"]["every"], plan["auto"]["roles"]) == (expected.every, ["recovery"])
    assert main(["status", str(slow)]) == 0
    status = capsys.readouterr().out
    last = cadences(slow)[-1]
    assert f"cadence: recovery every {last['every']} steps since step {last['step']} (Daly's optimum" in status
    assert "after 1 interruption" in status and "1 interruptions" not in status
