"""The run tools (`status`, `diff`, `plot`, `export`) on real runs: one straight run and the same run SIGKILLed
after a few steps and resumed with +resume=latest, made once for the whole module by scripts/kill_and_resume.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from curry_train.checkpoint.policy import Role
from curry_train.checkpoint.store import RunDir
from curry_train.cli import main
from curry_train.config import DataConfig, ModelConfig
from curry_train.data import Slicing, dev_batches, load_corpus
from curry_train.history import read_run
from curry_train.journal import read_journal
from curry_train.metrics import read_metrics
from curry_train.model import Transformer
from curry_train.units import human_bytes
from tests.conftest import FAST, kill_and_resume

STEPS = 12
OVERRIDES = [
    *FAST,
    f"train.steps={STEPS}",
    "train.eval_every=4",
    "checkpoint.rollback_every=2",
    "checkpoint.recovery_every=4",
    "checkpoint.retention.rollback_keep=2",
    "checkpoint.retention.recovery_keep=1",
    "checkpoint.best_k=2",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(straight run, killed-and-resumed run) directories, shared by every test here."""
    root = tmp_path_factory.mktemp("runs")
    straight, killed, _ = kill_and_resume(root, OVERRIDES, kill_at=7, nproc=1, name="tools", timeout=300)
    return straight, killed


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    assert main(list(args)) == 0
    return capsys.readouterr().out.splitlines()


def _resume_step(run_dir: Path) -> int:
    (resume,) = [e for e in read_journal(run_dir / "journal.jsonl") if e["event"] == "resume"]
    return int(resume["step"])


# ---------------------------------------------------------------------------------------------- status


def test_the_journal_records_where_the_killed_attempt_stopped(runs: tuple[Path, Path]) -> None:
    straight, killed = runs
    ends = [e for e in read_journal(killed / "journal.jsonl") if e["event"] == "attempt_end"]
    # The killed attempt's last completed step is its last metrics line.
    attempt0 = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines() if line]
    last = [line["step"] for line in attempt0 if line["attempt"] == 0][-1]
    assert len(ends) == 1 and ends[0]["attempt"] == 0 and ends[0]["step"] == last >= 7
    assert not [e for e in read_journal(straight / "journal.jsonl") if e["event"] == "attempt_end"]


def test_status_names_the_resume_on_its_first_line(runs: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    straight, killed = runs
    resumed_from = _resume_step(killed)
    stopped = next(e for e in read_journal(killed / "journal.jsonl") if e["event"] == "attempt_end")["step"]
    lines = _run(capsys, "status", str(killed))
    assert lines[0] == f"tools-killed: resumed from step {resumed_from} (1 resume)"
    assert (
        f"{STEPS} of {STEPS} steps done (finished)" in lines[1] and "latest -> recovery/step-00000012.dcp" in lines[1]
    )
    text = "\n".join(lines)
    assert f"attempt 0 stopped after step {stopped} (no run_end or preempt" in text
    redone = stopped - resumed_from
    assert f"(attempt 1, {redone} step{'' if redone == 1 else 's'} redone)" in text
    assert lines[-1].startswith("storage: ") and "the plan commits" in lines[-1]
    assert _run(capsys, "status", str(straight))[0] == "tools-straight: ran straight through"
    # `ls` opens with the same summary.
    assert _run(capsys, "ls", str(killed))[0] == lines[0]


def test_status_shows_rollbacks_and_events_it_does_not_know(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = shutil.copytree(runs[1], tmp_path / "copy", symlinks=True)
    # What the rollback below leaves on disk: its newest rollback checkpoint set aside, latest on the one before.
    store = RunDir(run)
    *kept, newest = store.list(Role.ROLLBACK)
    aside = human_bytes(store.manifest(newest).total_bytes)
    store.roll_back(kept[-1], [newest])
    extra = [
        # The rollback event the loss-spike issue adds, and an event no reader knows yet.
        {
            "event": "rollback",
            "step": 4,
            "spike_step": 9,
            "skipped": [[40, 72]],
            "optimizer_restored": True,
            "set_aside": ["rollback/.abandoned-step-00000006.dcp"],
            "loss": 9.5,
            "baseline": 4.1,
        },
        {"event": "spike_alarm", "step": 9, "detail": {"window": 20}},
    ]
    with open(run / "journal.jsonl", "a") as f:
        for record in extra:
            f.write(json.dumps({"time": "2026-01-01T00:00:00+00:00", **record}) + "\n")
    lines = _run(capsys, "status", str(run))
    assert lines[0] == f"copy: resumed from step {_resume_step(run)} (1 resume), rolled back to step 4"
    text = "\n".join(lines)
    assert (
        "rolled back to step 4 from step 9 (loss 9.5, baseline 4.1); skipped samples [40, 72); optimizer "
        "restored; 1 checkpoint set aside" in text
    )
    assert "spike_alarm at step 9: detail window 20" in text
    assert lines[-1].startswith("storage: ") and f", plus {aside} in 1 set aside by rollbacks;" in lines[-1]
    pytest.importorskip("matplotlib")
    from curry_train.plot import plot_runs

    result = plot_runs([read_run(run)], tmp_path / "events.png")
    assert {"rollback", "spike_alarm", "resume"} <= set(result.events["copy"])


# ------------------------------------------------------------------------------------------------ diff


def test_diff_of_killed_and_straight_is_bitwise_identical(
    runs: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    straight, killed = runs
    lines = _run(capsys, "diff", str(straight), str(killed))
    # One headline per run, each after its name, as `status` opens with it.
    assert (
        lines[0]
        == f"tools-straight: ran straight through; tools-killed: resumed from step {_resume_step(killed)} (1 resume)"
    )
    assert "config: 1 key differs:" in lines
    assert any(line.split() == ["run.id", "'tools-straight'", "->", "'tools-killed'"] for line in lines)
    assert f"  loss: bitwise identical over steps 1-{STEPS}" in lines
    assert "  dev_loss: bitwise identical over 3 common steps in 4-12" in lines


def test_diff_names_the_first_step_that_differs(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    straight = runs[0]
    other = shutil.copytree(straight, tmp_path / "other", symlinks=True)
    lines = [json.loads(line) for line in (other / "metrics.jsonl").read_text().splitlines() if line]
    for line in lines:
        if line["step"] >= 9:
            line["loss"] += 1e-3 * (line["step"] - 8)
    (other / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = "\n".join(_run(capsys, "diff", str(straight), str(other)))
    assert "loss: differs at 4 of 12 common steps (steps 1-12); first at step 9" in out
    assert "largest difference 0.004 at step 12" in out


# ------------------------------------------------------------------------------------------------ plot


def test_plot_is_a_png_with_one_curve_per_run_and_the_events(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("matplotlib")
    from curry_train.plot import plot_runs

    straight, killed = runs
    result = plot_runs([read_run(straight), read_run(killed)], tmp_path / "direct.png")
    assert sorted(result.train_lines) == ["tools-killed", "tools-straight"]
    assert sorted(result.dev_lines) == ["tools-killed", "tools-straight"]
    assert len(result.train_lines["tools-killed"].get_xdata()) == STEPS
    assert "resume" in result.events["tools-killed"] and "resume" not in result.events["tools-straight"]
    for name in ("tools-killed", "tools-straight"):
        assert {"save", "delete"} <= set(result.events[name])
    out = tmp_path / "loss.png"
    assert _run(capsys, "plot", str(straight), str(killed), "-o", str(out)) == [f"wrote {out}"]
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1320, 660) and len(data) > 20_000


# ---------------------------------------------------------------------------------------------- export


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _model_of(run_dir: Path) -> tuple[dict, Transformer]:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return config, Transformer(ModelConfig(**config["model"]))


def test_export_loads_strictly_and_reproduces_the_dev_loss(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    killed = runs[1]
    out = tmp_path / "best.safetensors"
    (line,) = _run(capsys, "export", str(killed), "-o", str(out))
    # By default the best best-K checkpoint: the lowest dev loss of the run.
    current = read_metrics(killed / "metrics.jsonl")
    best_step = min(
        (s for s in current if current[s].get("dev_loss") is not None), key=lambda s: current[s]["dev_loss"]
    )
    assert line.startswith(f"exported {killed}/best-k/") and f"step-{best_step:08d}.dcp -> {out}" in line
    config, model = _model_of(killed)
    model.load_state_dict(safetensors.load_file(out), strict=True)
    # The dev loss as training computes it (same batches, one rank): the mean of the batches' losses.
    t = config["train"]
    corpus = load_corpus(DataConfig(**config["data"]))
    batches = dev_batches(
        corpus.dev, DataConfig(**config["data"]), Slicing(t["batch_size"], 1, 0, 1), t["seed"], t["eval_batches"]
    )
    with torch.no_grad():
        losses = [F.cross_entropy(model(b["input"]).flatten(0, 1), b["target"].flatten()).item() for b in batches]
    assert sum(losses) / len(losses) == pytest.approx(current[best_step]["dev_loss"], rel=1e-6, abs=0)
    # Readable as the umask allows (safetensors alone makes it 0600), like any file the user writes.
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()
    # A cast on the way out, under a group-readable umask.
    old = os.umask(0o027)
    try:
        assert main(["export", str(killed), "-o", str(tmp_path / "bf16.safetensors"), "--dtype", "bf16"]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "bf16.safetensors").stat().st_mode & 0o777 == 0o640
    assert {t.dtype for t in safetensors.load_file(tmp_path / "bf16.safetensors").values()} == {torch.bfloat16}
    assert main(["export", str(killed), "-o", str(tmp_path / "x"), "--format", "onnx"]) == 2
    assert "allowed: safetensors, hf" in capsys.readouterr().err


def test_hf_export_gives_transformers_the_same_logits(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from curry_train.export import iter_parameters

    killed = runs[1]
    ckpt = killed / "recovery" / "step-00000012.dcp"  # a full checkpoint: only its parameters are read
    out = tmp_path / "hf"
    _run(capsys, "export", str(ckpt), "--format", "hf", "-o", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~_umask()
    hf, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    _, ours = _model_of(killed)
    ours.load_state_dict(dict(iter_parameters(ckpt)), strict=True)
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ours(tokens), hf(tokens).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_journal_lines_read_in_order(runs: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    killed = runs[1]
    lines = _run(capsys, "journal", str(killed))
    # Retention deletes show the deleted checkpoint's step as ckpt_step (a start's clean-up of leftovers is at the
    # step the launch starts from).
    deletes = [line for line in lines if "  delete  " in line and "exceeded" in line]
    assert deletes and all("ckpt_step=" in line for line in deletes)
    # Within a launch the step column never runs backwards (the `policy` line is journaled at step 0).
    steps: list[int] = []
    for line in lines:
        step = int(line.split("step", 1)[1].split()[0])
        if "  run_start" in line or "  attempt_end" in line:
            steps = []
        elif "  policy  " not in line:
            assert not steps or step >= steps[-1], line
            steps.append(step)
    policy = [line for line in lines if "  policy  " in line]
    assert policy and all(len(line) < 200 for line in policy)
    assert "rollback=2/keep2/full" in policy[0] and "commits=" in policy[0]
