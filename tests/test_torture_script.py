"""The torture script's command line (the torture itself is slow and runs outside the suite)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "torture.py"


def _torture():
    spec = importlib.util.spec_from_file_location("torture", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["torture"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_overrides_after_the_options_reach_every_launch() -> None:
    torture = _torture()
    args = torture.parse_args(["--cycles", "3", "--root", "somewhere", "--", "model=small", "train.steps=40"])
    assert (args.cycles, args.root, args.overrides) == (3, "somewhere", ["model=small", "train.steps=40"])
    assert torture.setting([*torture.DEFAULTS, *args.overrides], "train.steps", "0") == "40"


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--cycles", "0"], "--cycles must be positive"),
        (["--hang-timeout", "-1"], "--hang-timeout must be positive"),
        (["--spike-rounds", "1.5"], "--spike-rounds must be a fraction in [0, 1]"),
        (["--interrupts", "SIGKILL,SIGHUP"], "--interrupts: unknown SIGHUP; allowed: SIGKILL, SIGTERM"),
    ],
)
def test_bad_options_are_refused_naming_the_option(argv: list[str], named: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        _torture().parse_args(argv)
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err
