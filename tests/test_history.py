"""How `status` and `diff` word a run's events: every event in words, never cut inside a word, an event no reader
knows still shown, and `diff`'s first line saying which run each fact belongs to. Pure: journals written here."""

from __future__ import annotations

import json
from pathlib import Path

from curry_train.history import read_run
from curry_train.history_text import event_fact, history_lines, shorten
from curry_train.report import render_diff

TIME = "2026-01-01T00:00:00+00:00"
PROBLEM = "__1_0.distcp: size 3000000 bytes, manifest says 4194304 (truncated or overwritten)"


def _run(path: Path, *events: dict) -> Path:
    path.mkdir()
    start = {"event": "run_start", "time": TIME, "step": 0, "attempt": 0, "world_size": 2}
    (path / "journal.jsonl").write_text("".join(json.dumps({"time": TIME, **e}) + "\n" for e in [start, *events]))
    return path


def _words_of(text: str) -> set[str]:
    return set(text.replace(";", " ").replace(":", " ").split())


def test_resume_fallback_names_the_file_its_first_problem_and_the_fallback() -> None:
    fact = event_fact(
        {
            "event": "resume_fallback",
            "step": 10,
            "path": "recovery/step-00000010.dcp",
            "problems": [PROBLEM, "__0_0.distcp: xxh3-64 checksum 1f, manifest says 2e (corrupted)"],
            "fallback": "recovery/step-00000005.dcp",
        }
    )
    assert fact == (
        f"checkpoint recovery/step-00000010.dcp failed verification: {PROBLEM} (and 1 more problem); "
        "fell back to recovery/step-00000005.dcp"
    )
    last = event_fact(
        {"event": "resume_fallback", "step": 5, "path": "r/s.dcp", "problems": [PROBLEM], "fallback": None}
    )
    assert last.endswith(f"{PROBLEM}; no other checkpoint to fall back to")


def test_an_injected_spike_says_which_step_shows_it() -> None:
    fact = event_fact({"event": "spike_injected", "step": 6, "lr_scale": 1000.0, "reason": "+debug.inject_spike_at"})
    assert (
        fact == "spike injected by +debug.inject_spike_at: step 6's lr multiplied by 1000 (the loss of step 7 shows it)"
    )


def test_a_hang_names_the_rank_its_heartbeats_showed_lost() -> None:
    hang = {"event": "hang", "step": 4, "rank": 0, "host": "a", "phase": "step 5", "seconds": 21.0}
    lost = {**hang, "lost": [1], "lost_named": "rank 1 on b (10.0.0.2)"}
    assert event_fact(hang) == "rank 0 on a hung during step 5: no progress for 21.0 s (stacks in failures.log)"
    assert event_fact(lost) == (
        "rank 0 on a hung during step 5: no progress for 21.0 s, lost rank 1 on b (10.0.0.2) (stacks in failures.log)"
    )


def test_an_unknown_event_is_shown_in_words_and_cut_only_between_words() -> None:
    reason = "the watchdog saw no collective finish for 1800 seconds on rank 3 while it was waiting in all_reduce " * 3
    event = {"event": "link_flap", "step": 41, "rank": 3, "seconds": 1800.5, "reason": reason, "ranks": [0, 1]}
    fact = event_fact(event)
    assert fact.startswith("link_flap at step 41: rank 3; seconds 1800.5; reason the watchdog saw no collective")
    assert fact.endswith("; ranks 0, 1")
    assert " ...;" in fact and len(fact) < 200
    # Every word shown is a whole word of the event.
    shown = f"link_flap at step 41 rank 3 seconds 1800.5 reason {reason} ranks 0, 1"
    assert _words_of(fact) - {"..."} <= _words_of(shown)
    assert "=" not in fact and "[" not in fact and "{" not in fact
    assert shorten("one-long-word" * 20, 30) == "one-long-word" * 20


def test_status_history_has_a_line_for_each_event_kind(tmp_path: Path) -> None:
    run = read_run(
        _run(
            tmp_path / "run",
            {"event": "spike_injected", "step": 6, "lr_scale": 1000, "reason": "+debug.inject_spike_at"},
            {"event": "rollback", "step": 4, "path": "rollback/step-00000004.dcp", "spike_step": 7, "loss": None},
            {"event": "retune", "step": 20, "rollback_every": {"old": 100, "new": 50}},
        )
    )
    lines = history_lines(run)
    assert lines[0] == "2026-01-01 00:00:00  attempt 0 started at step 0 on 2 ranks"
    assert lines[1].endswith(
        "spike injected by +debug.inject_spike_at: step 6's lr multiplied by 1000 (the loss of step 7 shows it)"
    )
    assert lines[2].endswith("rolled back to step 4 from step 7 (loss not finite)")
    assert lines[3].endswith("retune at step 20: rollback every old 100, new 50")


def test_diff_gives_each_run_its_own_headline(tmp_path: Path) -> None:
    rollback = {"event": "rollback", "step": 50, "spike_step": 60, "loss": 61.0, "baseline": 2.5}
    spiky = read_run(_run(tmp_path / "spiky", rollback))
    resume = {"event": "resume", "step": 70, "path": "recovery/step-00000070.dcp", "exact": True}
    spiky2 = read_run(_run(tmp_path / "spiky2", rollback, resume))
    top = render_diff(spiky2, spiky).splitlines()[0]
    assert top == "spiky2: resumed from step 70 (1 resume), rolled back to step 50; spiky: rolled back to step 50"
