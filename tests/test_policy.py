"""Unit tests for the pure checkpoint policy (no torch, no disk)."""

import math

import pytest

from curry_train.checkpoint.policy import (
    BestK,
    Checkpoint,
    Contents,
    Direction,
    Policy,
    Role,
    SaveDecision,
    SaveReason,
    abandoned_by_rollback,
    best_k_decision,
    by_policy,
    decide_save,
    exact_resume_points,
    is_better,
    largest_save,
    parse_checkpoint_name,
    rank_best_k,
    retention,
    roles_due,
    rollback_target,
    skipped_range,
)


def rb(step: int) -> Checkpoint:
    return Checkpoint(Role.ROLLBACK, step)


def rc(step: int) -> Checkpoint:
    return Checkpoint(Role.RECOVERY, step)


def bk(step: int, value: float, metric: str = "dev_loss") -> Checkpoint:
    return Checkpoint(Role.BEST_K, step, value, metric)


def deleted(deletions: list) -> list[str]:
    return [d.checkpoint.relpath for d in deletions]


# --- roles_due ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, []),
        (1, []),
        (99, []),
        (100, [Role.ROLLBACK]),
        (900, [Role.ROLLBACK]),
        (1000, [Role.ROLLBACK, Role.RECOVERY]),
        (2000, [Role.ROLLBACK, Role.RECOVERY]),
    ],
)
def test_roles_due_at_cadence_multiples(step: int, expected: list[Role]) -> None:
    assert roles_due(Policy(rollback_every=100, recovery_every=1000), step) == expected


def test_roles_due_never_at_step_zero_even_with_cadence_one() -> None:
    assert roles_due(Policy(rollback_every=1, recovery_every=1), 0) == []
    assert roles_due(Policy(rollback_every=1, recovery_every=1), 1) == [Role.ROLLBACK, Role.RECOVERY]


def test_roles_due_skips_disabled_roles() -> None:
    policy = Policy(rollback_every=0, recovery_every=50)
    assert roles_due(policy, 100) == [Role.RECOVERY]
    assert roles_due(Policy(rollback_every=0, recovery_every=0), 1000) == []


def test_roles_due_never_returns_best_k() -> None:
    policy = Policy(rollback_every=1, recovery_every=1, best_k=3)
    assert all(Role.BEST_K not in roles_due(policy, step) for step in range(50))


# --- names -------------------------------------------------------------------------------------------------


def test_names_and_relpaths_match_the_run_directory_layout() -> None:
    assert rb(500).relpath == "rollback/step-00000500.dcp"
    assert rc(1000).relpath == "recovery/step-00001000.dcp"
    assert bk(450, 2.341).relpath == "best-k/dev-loss-2.341-step-00000450.dcp"
    assert Role.BEST_K.dirname == "best-k"
    assert f"{Role.ROLLBACK}" == "rollback"  # journal and log lines format roles with f-strings


@pytest.mark.parametrize("value", [2.341, 1e-05, -0.5, -3.25e-12, 0.0, 1.5e20, 0.1 + 0.2, 123456789.0, 2])
@pytest.mark.parametrize("metric", ["dev_loss", "acc", "top_5", "x_1e"])
def test_best_k_names_round_trip_exactly(value: float, metric: str) -> None:
    checkpoint = bk(450, value, metric)
    parsed = parse_checkpoint_name(Role.BEST_K, checkpoint.name)
    assert parsed == checkpoint
    assert parsed is not None and parsed.metric == float(value) and parsed.metric_name == metric
    assert parsed.name == checkpoint.name


def test_values_that_a_fixed_format_would_merge_get_distinct_names() -> None:
    assert bk(1, 2.34101).name != bk(1, 2.34102).name


@pytest.mark.parametrize("role", [Role.ROLLBACK, Role.RECOVERY])
@pytest.mark.parametrize("step", [0, 1, 500, 99_999_999, 123_456_789_012])
def test_step_names_round_trip(role: Role, step: int) -> None:
    checkpoint = Checkpoint(role, step)
    assert parse_checkpoint_name(role, checkpoint.name) == checkpoint


@pytest.mark.parametrize(
    ("role", "name"),
    [
        (Role.ROLLBACK, ".tmp-step-00000500.dcp"),
        (Role.ROLLBACK, "step-00000500.dcp.tmp"),
        (Role.ROLLBACK, "step-500.dcp"),
        (Role.ROLLBACK, "step-000000500.dcp"),  # not the canonical 8-digit spelling
        (Role.RECOVERY, "step-0000050a.dcp"),
        (Role.RECOVERY, "latest"),
        (Role.RECOVERY, ""),
        (Role.ROLLBACK, "dev-loss-2.341-step-00000450.dcp"),  # a best-K name is not a rollback
        (Role.BEST_K, "step-00000450.dcp"),
        (Role.BEST_K, ".tmp-dev-loss-2.341-step-00000450.dcp"),
        (Role.BEST_K, "dev-loss-2.3410-step-00000450.dcp"),  # not repr's spelling
        (Role.BEST_K, "dev-loss-nan-step-00000450.dcp"),
        (Role.BEST_K, "dev-loss-inf-step-00000450.dcp"),
        (Role.BEST_K, "dev-loss-1e999-step-00000450.dcp"),
        (Role.BEST_K, "dev-loss-step-00000450.dcp"),
        (Role.BEST_K, "junk"),
    ],
)
def test_parse_rejects_uncommitted_and_foreign_names(role: Role, name: str) -> None:
    assert parse_checkpoint_name(role, name) is None


def test_checkpoint_rejects_inconsistent_fields() -> None:
    with pytest.raises(ValueError, match="finite"):
        bk(10, math.nan)
    with pytest.raises(ValueError, match="no metric"):
        Checkpoint(Role.ROLLBACK, 10, 1.0, "dev_loss")
    with pytest.raises(ValueError, match="step"):
        rb(-1)


# --- Policy validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"rollback_every": -1}, "checkpoint.rollback_every=-1"),
        ({"recovery_every": -5}, "checkpoint.recovery_every=-5"),
        ({"best_k": -1}, "checkpoint.best_k=-1"),
        ({"rollback_keep": -2}, "checkpoint.retention.rollback_keep=-2"),
        ({"recovery_keep": 1.5}, "checkpoint.retention.recovery_keep=1.5"),
        ({"rollback_keep": 0}, "checkpoint.retention.rollback_keep=0 with rollback_every=100"),
        ({"recovery_keep": 0}, "checkpoint.retention.recovery_keep=0 with recovery_every=1000"),
        (
            {"best_k_direction": "min"},
            "checkpoint.best_k_direction='min': allowed values are 'minimize', 'maximize'",
        ),
        (
            {"rollback_contents": "all"},
            "checkpoint.rollback_contents='all': allowed values are 'full', 'params'",
        ),
        ({"best_k_metric": "dev loss"}, "checkpoint.best_k_metric='dev loss'"),
        ({"best_k_metric": "loss_"}, "checkpoint.best_k_metric='loss_'"),
    ],
)
def test_policy_errors_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError) as info:
        Policy(**kwargs)
    assert key in str(info.value)


def test_policy_accepts_strings_for_enums_and_zero_keep_for_disabled_role() -> None:
    policy = Policy(best_k_direction="maximize", rollback_contents="params", rollback_every=0, rollback_keep=0)
    assert policy.best_k_direction is Direction.MAXIMIZE
    assert policy.rollback_contents is Contents.PARAMS


# --- best-K ------------------------------------------------------------------------------------------------


def test_is_better_by_direction() -> None:
    assert is_better(Direction.MINIMIZE, 1.0, 2.0) and not is_better(Direction.MINIMIZE, 2.0, 1.0)
    assert is_better(Direction.MAXIMIZE, 2.0, 1.0) and not is_better(Direction.MAXIMIZE, 1.0, 2.0)
    assert not is_better(Direction.MINIMIZE, 1.0, 1.0)
    assert not is_better(Direction.MINIMIZE, math.nan, 1.0)


def test_rank_best_k_in_both_directions_ignores_other_roles_and_metrics() -> None:
    existing = [bk(100, 3.0), bk(200, 1.0), rb(200), bk(300, 2.0), bk(400, 0.5, "dev_ppl")]
    assert [c.step for c in rank_best_k(Policy(), existing)] == [200, 300, 100]
    assert [c.step for c in rank_best_k(Policy(best_k_direction="maximize"), existing)] == [100, 300, 200]


def test_rank_best_k_puts_the_earlier_step_first_among_equals() -> None:
    ranked = rank_best_k(Policy(), [bk(300, 1.0), bk(100, 1.0), bk(200, 1.0)])
    assert [c.step for c in ranked] == [100, 200, 300]


def test_best_k_admits_while_fewer_than_k_are_held() -> None:
    decision = best_k_decision(Policy(best_k=3), [bk(100, 1.0), rb(100), rc(100)], 200, 5.0)
    assert decision.admit and decision.evict == []


def test_best_k_admission_evicts_the_worst() -> None:
    existing = [bk(100, 3.0), bk(200, 2.0), bk(300, 1.0)]
    decision = best_k_decision(Policy(best_k=3), existing, 400, 1.5)
    assert decision.admit
    assert decision.evict == [bk(100, 3.0)]


def test_best_k_maximize_evicts_the_smallest() -> None:
    existing = [bk(100, 0.7, "dev_acc"), bk(200, 0.9, "dev_acc")]
    policy = Policy(best_k=2, best_k_metric="dev_acc", best_k_direction="maximize")
    assert best_k_decision(policy, existing, 300, 0.8).evict == [bk(100, 0.7, "dev_acc")]
    assert not best_k_decision(policy, existing, 300, 0.6).admit


def test_best_k_tie_with_the_kth_is_not_admitted_and_evicts_nothing() -> None:
    existing = [bk(100, 1.0), bk(200, 2.0)]
    decision = best_k_decision(Policy(best_k=2), existing, 300, 2.0)
    assert not decision.admit and decision.evict == []
    assert "2.0" in decision.reason


def test_best_k_tie_above_the_kth_ranks_after_the_existing_equal() -> None:
    existing = [bk(100, 1.0), bk(200, 2.0)]
    decision = best_k_decision(Policy(best_k=2), existing, 300, 1.0)
    assert decision.admit and decision.evict == [bk(200, 2.0)]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_best_k_never_admits_non_finite(value: float) -> None:
    decision = best_k_decision(Policy(best_k=3), [], 100, value)
    assert not decision.admit and decision.evict == []
    assert "not finite" in decision.reason


def test_best_k_zero_never_admits() -> None:
    decision = best_k_decision(Policy(best_k=0), [], 100, 0.1)
    assert not decision.admit and "disabled" in decision.reason


def test_best_k_after_k_shrank_evicts_everything_pushed_out() -> None:
    existing = [bk(100, 1.0), bk(200, 2.0), bk(300, 3.0)]
    decision = best_k_decision(Policy(best_k=1), existing, 400, 0.5)
    assert decision.admit and decision.evict == [bk(100, 1.0), bk(200, 2.0), bk(300, 3.0)]


def test_best_k_class_admits_evicts_and_keeps_the_ranking() -> None:
    best = BestK(Policy(best_k=2), [bk(100, 2.0), bk(200, 3.0)])
    admission = best.admit(300, 1.0)
    assert admission is not None and admission.checkpoint == bk(300, 1.0) and admission.evict == [bk(200, 3.0)]
    assert best.admit(400, 2.5) is None  # ranks against the updated top 2 (1.0, 2.0), not the listing it began with
    assert sorted(c.step for c in best.checkpoints) == [100, 300]


def test_best_k_class_rounds_to_six_significant_digits_and_ties_keep_the_earlier() -> None:
    best = BestK(Policy(best_k=1), [])
    first = best.admit(100, 2.3410249)
    assert first is not None and first.checkpoint.metric == 2.34102
    assert first.checkpoint.name == "dev-loss-2.34102-step-00000100.dcp"
    assert best.admit(200, 2.341021) is None  # equal to six digits: a tie, and the earlier checkpoint stays
    assert best.admit(300, 2.34101) is not None  # better at six digits: admitted


def test_best_k_class_ignores_a_resumed_run_evaluating_the_same_step_again() -> None:
    best = BestK(Policy(best_k=3), [bk(100, 1.0)])
    assert best.admit(100, 1.0000001) is None  # the same step and (rounded) value: already on disk
    again = best.admit(100, 0.5)  # the same step, another value: a new trajectory after a rollback
    assert again is not None and again.checkpoint == bk(100, 0.5)


def test_best_k_class_disabled_admits_nothing() -> None:
    assert BestK(Policy(best_k=0), []).admit(100, 0.1) is None


# --- retention ---------------------------------------------------------------------------------------------


def test_retention_deletes_oldest_beyond_keep_oldest_first() -> None:
    committed = [rb(s) for s in (500, 100, 300, 200, 400)] + [rc(s) for s in (1000, 2000)]
    deletions = retention(Policy(rollback_keep=3, recovery_keep=3), committed)
    assert deleted(deletions) == ["rollback/step-00000100.dcp", "rollback/step-00000200.dcp"]
    assert all(d.reason == "rollback keep=3 exceeded" for d in deletions)


def test_retention_keeps_protected_latest_in_addition_to_keep() -> None:
    committed = [rc(s) for s in (1000, 2000, 3000, 4000)]
    deletions = retention(Policy(recovery_keep=2), committed, protected={"recovery/step-00001000.dcp"})
    assert deleted(deletions) == ["recovery/step-00002000.dcp"]  # 1000 kept, and 3000, 4000 still kept


def test_retention_protected_inside_window_takes_a_slot() -> None:
    committed = [rc(s) for s in (1000, 2000, 3000)]
    deletions = retention(Policy(recovery_keep=2), committed, protected={"recovery/step-00003000.dcp"})
    assert deleted(deletions) == ["recovery/step-00001000.dcp"]


def test_retention_never_deletes_across_roles() -> None:
    # Many old best-K and recovery checkpoints: none is a rollback, so rollback keep=1 must not touch them.
    committed = [rb(900), rb(800)] + [rc(s) for s in (10, 20)] + [bk(s, float(s)) for s in (5, 15)]
    deletions = retention(Policy(rollback_keep=1, recovery_keep=5, best_k=5), committed)
    assert deleted(deletions) == ["rollback/step-00000800.dcp"]


def test_retention_best_k_keeps_top_k_by_rank() -> None:
    committed = [bk(100, 3.0), bk(200, 1.0), bk(300, 2.0), bk(400, 4.0), rb(100)]
    deletions = retention(Policy(best_k=2), committed)
    assert deleted(deletions) == [bk(400, 4.0).relpath, bk(100, 3.0).relpath]  # worst first
    assert all(d.reason.startswith("best_k=2 exceeded") for d in deletions)


def test_retention_leaves_disabled_roles_and_other_metrics_alone() -> None:
    committed = [rb(s) for s in range(100, 1100, 100)] + [bk(s, float(s), "dev_acc") for s in (1, 2, 3, 4)]
    policy = Policy(rollback_every=0, rollback_keep=0, best_k=1)
    assert retention(policy, committed) == []
    assert retention(Policy(best_k=0), [bk(s, float(s)) for s in (1, 2, 3, 4)]) == []


def test_retention_returns_no_duplicates() -> None:
    committed = [rb(100), rb(100), rb(200), rb(200), rb(300)]
    assert deleted(retention(Policy(rollback_keep=1), committed)) == [rb(100).relpath, rb(200).relpath]


# --- resume and rollback -----------------------------------------------------------------------------------


def test_exact_resume_points_full_rollback_newest_first_recovery_wins_ties() -> None:
    committed = [rb(900), rc(1000), rb(1000), bk(950, 1.0), rc(500)]
    assert exact_resume_points(committed, by_policy(Policy())) == [rc(1000), rb(1000), rb(900), rc(500)]


def test_exact_resume_points_exclude_params_only_rollbacks() -> None:
    committed = [rb(900), rc(500), bk(950, 1.0)]
    assert exact_resume_points(committed, by_policy(Policy(rollback_contents="params"))) == [rc(500)]


def test_exact_resume_points_ask_only_of_rollback_and_recovery() -> None:
    # A run directory answers from each manifest: best-K ones (parameters only) are never read.
    asked = []
    full = {rc(500), rb(1000)}
    points = exact_resume_points([rb(900), bk(950, 1.0), rc(500), rb(1000)], lambda c: asked.append(c) or c in full)
    assert points == [rb(1000), rc(500)] and bk(950, 1.0) not in asked


def test_rollback_target_is_newest_at_or_before_the_bound() -> None:
    committed = [rb(800), rb(900), rb(1000), rc(500), bk(950, 1.0)]
    assert rollback_target(committed, 999) == rb(900)
    assert rollback_target(committed, 1000) == rb(1000)
    assert rollback_target(committed, 960) == rb(900)  # best-K is never a target, however close
    assert rollback_target(committed, 599) == rc(500)
    assert rollback_target(committed, 499) is None
    assert rollback_target([rb(1000), rc(1000)], 1000) == rc(1000)  # recovery wins a tie: it holds full state
    # A preemption's extra save at step 950 exists only because the run was stopped there: an automatic rollback
    # passes it by, so that it goes where an uninterrupted run goes.
    assert rollback_target([rb(900), rc(950)], 999) == rc(950)
    assert rollback_target([rb(900), rc(950)], 999, passed_by=frozenset({950})) == rb(900)


def test_a_rollback_sets_aside_the_newer_rollback_and_recovery_checkpoints_newest_first() -> None:
    committed = [rb(10), rb(15), rb(20), rc(20), rb(25), bk(22, 1.0), bk(5, 2.0)]
    assert abandoned_by_rollback(committed, 15) == [rb(25), rc(20), rb(20)]
    assert abandoned_by_rollback(committed, 25) == []
    # Best-K of the abandoned trajectory stays: real measurements of real parameters.
    assert all(c.role is not Role.BEST_K for c in abandoned_by_rollback(committed, 0))


def test_skipped_range_covers_the_abandoned_steps_and_the_extra_batches() -> None:
    # Rolled back to a checkpoint whose cursor is 120; the spike step left the cursor at 208 (11 steps of 8).
    assert skipped_range(120, 208, 0, 8) == (120, 208)
    assert skipped_range(120, 208, 3, 8) == (120, 232)
    assert skipped_range(120, 120, 0, 8) == (120, 120)  # nothing abandoned: nothing skipped
    with pytest.raises(ValueError, match="out of order"):
        skipped_range(208, 120, 0, 8)


def test_policy_and_journal_import_no_torch() -> None:
    """The policy is pure logic: importing it (and the journal, store and CLI helpers it sits beside) loads no torch."""
    import subprocess
    import sys

    probe = (
        "import sys, curry_train.checkpoint.policy, curry_train.journal, curry_train.checkpoint.store,"
        " curry_train.spike;"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# --- decide_save: one decision for every save site ------------------------------------------------------------


def test_cadence_saves_the_roles_due_with_their_contents() -> None:
    policy = Policy(rollback_every=10, recovery_every=50)
    assert decide_save(policy, 7, SaveReason.CADENCE) is None
    assert decide_save(policy, 10, SaveReason.CADENCE) == SaveDecision((Role.ROLLBACK,), Contents.FULL)
    assert decide_save(policy, 50, SaveReason.CADENCE) == SaveDecision((Role.ROLLBACK, Role.RECOVERY), Contents.FULL)
    light = Policy(rollback_every=10, recovery_every=50, rollback_contents="params")
    assert decide_save(light, 10, SaveReason.CADENCE) == SaveDecision((Role.ROLLBACK,), Contents.PARAMS)
    # A recovery role in the same save makes it full, and the linked rollback checkpoint with it.
    assert decide_save(light, 50, SaveReason.CADENCE) == SaveDecision((Role.ROLLBACK, Role.RECOVERY), Contents.FULL)


@pytest.mark.parametrize("reason", [SaveReason.FINAL, SaveReason.PREEMPTION])
def test_final_and_preemption_need_a_full_save_unless_the_cadence_makes_one(reason: SaveReason) -> None:
    policy = Policy(rollback_every=10, recovery_every=50)
    assert decide_save(policy, 10, reason) is None  # the full rollback save of step 10 is enough
    assert decide_save(policy, 13, reason) == SaveDecision((Role.RECOVERY,), Contents.FULL)
    light = Policy(rollback_every=10, recovery_every=50, rollback_contents="params")
    assert decide_save(light, 10, reason) == SaveDecision((Role.RECOVERY,), Contents.FULL)
    # Only a full rollback role saves: the extra save is a rollback checkpoint, which retention rotates away.
    only_rollback = Policy(rollback_every=10, recovery_every=0)
    assert decide_save(only_rollback, 13, reason) == SaveDecision((Role.ROLLBACK,), Contents.FULL)
    # No cadence at all: a recovery checkpoint, kept until removed by hand.
    assert decide_save(Policy(rollback_every=0, recovery_every=0), 13, reason) == SaveDecision(
        (Role.RECOVERY,), Contents.FULL
    )


def test_staging_is_prepared_for_the_largest_save_the_cadence_makes() -> None:
    assert largest_save(Policy()) is Contents.FULL
    assert largest_save(Policy(recovery_every=0, rollback_every=10)) is Contents.FULL  # full rollback by default
    assert largest_save(Policy(recovery_every=0, rollback_contents="params")) is Contents.PARAMS
    assert largest_save(Policy(recovery_every=0, rollback_every=0, best_k=2)) is Contents.PARAMS
    assert largest_save(Policy(recovery_every=0, rollback_every=0, best_k=0)) is None


def test_resave_repeats_the_target_roles_without_best_k() -> None:
    policy = Policy(rollback_every=10, recovery_every=50, rollback_contents="params")
    assert decide_save(policy, 20, SaveReason.RESAVE, (Role.ROLLBACK, Role.BEST_K)) == SaveDecision(
        (Role.ROLLBACK,), Contents.PARAMS
    )
    assert decide_save(policy, 50, SaveReason.RESAVE, (Role.ROLLBACK, Role.RECOVERY)) == SaveDecision(
        (Role.ROLLBACK, Role.RECOVERY), Contents.FULL
    )
    assert decide_save(policy, 20, SaveReason.RESAVE, (Role.BEST_K,)) is None
