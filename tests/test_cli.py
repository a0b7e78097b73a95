"""The `curry-train` command's own edges: `--version`, and an optional extra that is not installed (matplotlib for
`plot`, safetensors for `export`) exits 2 with the pip command that installs it."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from curry_train.cli import main
from tests.conftest import _env


def test_version_is_the_installed_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"curry-train {version('curry-train')}"


def _without(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`curry-train ARGS` in a fresh interpreter where `module` cannot be imported, as when it is not installed."""
    code = (
        f"import sys; sys.modules[{module!r}] = None; from curry_train.cli import main; sys.exit(main({list(args)!r}))"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120
    )


def test_a_missing_extra_exits_2_with_the_pip_command(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    start = {"event": "run_start", "time": "2026-01-01T00:00:00+00:00", "step": 0, "attempt": 0, "world_size": 1}
    (run / "journal.jsonl").write_text(json.dumps(start) + "\n")
    plot = _without("matplotlib", "plot", str(run), "-o", str(tmp_path / "loss.png"), cwd=tmp_path)
    assert plot.returncode == 2, plot.stderr
    assert plot.stderr.strip() == (
        "curry-train plot: plot needs matplotlib, an optional dependency: pip install 'curry-train[plot]'"
    )
    export = _without("safetensors", "export", str(run), "-o", str(tmp_path / "m.safetensors"), cwd=tmp_path)
    assert export.returncode == 2, export.stderr
    assert export.stderr.strip() == (
        "curry-train export: export needs the safetensors package: pip install 'curry-train[export]'"
    )
