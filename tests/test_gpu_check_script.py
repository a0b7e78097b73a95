"""scripts/gpu_check.sh, the prepared check for a GPU machine, run with DEVICE=cpu so that it cannot rot unseen: its
kill-and-resume must come out bitwise identical and its benchmark must write every row."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.conftest import _env

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_script_runs_its_steps_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out)],
        cwd=REPO,
        env={**_env(), "DEVICE": "cpu", "MODEL": "tiny", "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_check: passed" in proc.stdout
    assert "bitwise identical" in (out / "kill_and_resume.txt").read_text()
    saves = [json.loads(line) for line in (out / "saves.jsonl").read_text().splitlines()]
    assert saves and all(s["mode"] == "async" and s["direct_io"] for s in saves)
    assert {"sync_save", "loop_async", "harness_step"} <= set(json.loads((out / "bench.json").read_text())["rows"])
    assert not (out / "runs").exists()
