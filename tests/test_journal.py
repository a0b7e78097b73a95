"""Unit tests for the JSONL event journal."""

import enum
import json
import math
from datetime import datetime
from pathlib import Path

import pytest

from curry_train.journal import EVENTS, Journal, format_event, read_journal


class Color(enum.Enum):
    RED = "red"


def test_append_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "run" / "journal.jsonl"  # parent does not exist yet
    with Journal(path) as journal:
        first = journal.append("run_start", 0, world_size=2)
        second = journal.append(
            "save",
            500,
            role="rollback",
            path=Path("rollback/step-00000500.dcp"),
            bytes=12_300_000,
            seconds=0.41,
        )
    records = read_journal(path)
    assert records == [first, second]
    assert list(records[1])[:3] == ["event", "time", "step"]
    assert records[1]["path"] == "rollback/step-00000500.dcp"
    assert datetime.fromisoformat(records[0]["time"]).utcoffset().total_seconds() == 0


def test_each_append_is_on_disk_before_it_returns(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    journal.append("save", 100, role="recovery")
    # Read while the writer still holds its handle: nothing may be sitting in a user-space buffer.
    assert [r["step"] for r in read_journal(path)] == [100]
    journal.append("delete", 100, reason="recovery keep=3 exceeded")
    assert path.read_text().count("\n") == 2
    journal.close()


def test_a_reopened_journal_appends(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        journal.append("run_start", 0)
    with Journal(path) as journal:
        journal.append("resume", 1000)
    assert [r["event"] for r in read_journal(path)] == ["run_start", "resume"]


def test_disabled_journal_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "journal.jsonl"
    journal = Journal(path, enabled=False)
    record = journal.append("save", 100, role="rollback")
    journal.close()
    assert record["event"] == "save"
    assert not path.exists() and not path.parent.exists()


def test_unknown_event_rejected_naming_allowed_ones(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.jsonl", enabled=False)  # ranks > 0 catch the same bug
    with pytest.raises(ValueError, match="unknown journal event 'saved'.*run_start"):
        journal.append("saved", 1)
    assert {"policy", "world_size_change", "save", "run_end"} <= EVENTS


def test_non_finite_floats_become_null_and_enums_their_value(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        journal.append(
            "best_k",
            450,
            value=math.nan,
            worst=math.inf,
            history=[1.0, -math.inf],
            extra={"color": Color.RED},
        )
    line = path.read_text()
    assert "NaN" not in line and "Infinity" not in line
    record = json.loads(line)  # strict JSON, readable by jq and friends
    assert record["value"] is None and record["worst"] is None and record["history"] == [1.0, None]
    assert record["extra"] == {"color": "red"}


def test_non_serialisable_field_raises_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal, pytest.raises(TypeError, match="'save'"):
        journal.append("save", 1, handle=object())
    assert not path.exists() or path.read_text() == ""


def test_time_field_is_reserved(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="time"):
        Journal(tmp_path / "j.jsonl").append("save", 1, time="yesterday")


def _write_lines(path: Path, *steps: int) -> list[str]:
    with Journal(path) as journal:
        for step in steps:
            journal.append("save", step)
    return path.read_text().splitlines(keepends=True)


def test_truncated_final_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    lines = _write_lines(path, 100, 200)
    path.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # a crash mid-write
    assert [r["step"] for r in read_journal(path)] == [100]


def test_corrupt_middle_line_raises_with_its_number(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    lines = _write_lines(path, 100, 200, 300)
    path.write_text(lines[0] + "{not json\n" + lines[2])
    with pytest.raises(ValueError, match="line 2"):
        read_journal(path)


def test_line_missing_required_keys_raises(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    lines = _write_lines(path, 100)
    path.write_text(lines[0] + '{"event": "save"}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_journal(path)


def test_appending_after_a_torn_line_keeps_the_journal_readable(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    lines = _write_lines(path, 100, 200)
    path.write_text(lines[0] + lines[1][:10])  # the crashed run's last write was cut
    with Journal(path) as journal:  # the resumed run
        journal.append("resume", 100)
    assert [(r["event"], r["step"]) for r in read_journal(path)] == [("save", 100), ("resume", 100)]


def test_complete_record_missing_only_its_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    lines = _write_lines(path, 100, 200)
    path.write_text(lines[0] + lines[1].rstrip("\n"))
    assert [r["step"] for r in read_journal(path)] == [100, 200]
    with Journal(path) as journal:
        journal.append("resume", 200)
    assert [r["step"] for r in read_journal(path)] == [100, 200, 200]


def test_format_event_save_line() -> None:
    record = {
        "event": "save",
        "time": "2026-11-27T10:41:02.512+00:00",
        "step": 500,
        "role": "rollback",
        "path": "rollback/step-00000500.dcp",
        "bytes": 12_300_000,
        "seconds": 0.412,
    }
    assert format_event(record) == (
        "2026-11-27 10:41:02  step     500  save      rollback  rollback/step-00000500.dcp  12.3 MB in 0.41 s"
    )


def test_format_event_converts_time_to_utc_and_appends_unknown_fields() -> None:
    record = {
        "event": "delete",
        "time": "2026-11-27T11:41:02+01:00",
        "step": 100,
        "reason": "rollback keep=5 exceeded",
        "free": None,
        "n": 3,
    }
    assert format_event(record) == (
        '2026-11-27 10:41:02  step     100  delete    reason="rollback keep=5 exceeded"  free=null  n=3'
    )


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (512, "512 B"),
        (1000, "1.0 KB"),
        (999_949, "999.9 KB"),
        (999_950, "1.0 MB"),
        (2_500_000_000, "2.5 GB"),
        (3e12, "3.0 TB"),
        (4e15, "4000.0 TB"),
    ],
)
def test_format_event_sizes_are_decimal(count: float, text: str) -> None:
    line = format_event({"event": "save", "time": "2026-01-01T00:00:00+00:00", "step": 1, "bytes": count})
    assert line.endswith(f"  {text}")
