"""curry-train: plan a run's checkpoint storage, and inspect, compare, plot and export the runs in its run
directories (runs/<run-id>); rehearse a run's resume before the long run: `curry-train rehearse [torchrun options]
overrides...`; and train: `curry-train run [torchrun options] overrides...` (or `python -m curry_train.train`,
`torchrun ... -m curry_train.train`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from curry_train import layout
from curry_train.checkpoint.plan import build_plan
from curry_train.checkpoint.plan_text import plan_json, render_plan
from curry_train.checkpoint.sizes import model_size
from curry_train.checkpoint.store import RunDir
from curry_train.compose import from_command_line
from curry_train.config import Config, ConfigError, validate
from curry_train.history import RunHistory, read_run
from curry_train.journal import Journal, format_events, read_journal
from curry_train.layout import RunFiles
from curry_train.report import render_diff, render_status
from curry_train.units import human_bytes


def _run_dir(path: str) -> Path:
    p = Path(path)
    if not RunFiles(p).journal.exists():
        raise SystemExit(f"curry-train: {p} is not a run directory (no {layout.JOURNAL})")
    return p


def cmd_journal(args: argparse.Namespace) -> int:
    """Print a run's journal, one readable line per event."""
    records = read_journal(RunFiles(_run_dir(args.run_dir)).journal)
    for record, line in zip(records, format_events(records), strict=True):
        if not args.event or record["event"] in args.event:
            print(line)
    return 0


def _history(path: str) -> RunHistory:
    return read_run(_run_dir(path))


def _on_remote(command: str, url: str, show: Callable[..., int]) -> int:
    """Run `show(remote)` for a run on checkpoint.remote (`<remote>/<run-id>`); a store that cannot be read is one
    line and status 2."""
    from curry_train import remote_view
    from curry_train.checkpoint.remote import RemoteError, describe_error

    try:
        return show(remote_view.open_run(url))
    except RemoteError as err:
        print(f"curry-train {command}: {err}", file=sys.stderr)
    except Exception as err:
        print(f"curry-train {command}: {url}: {describe_error(url, err)}", file=sys.stderr)
    return 2


def _print(lines: list[str], status: int = 0) -> int:
    print("\n".join(lines))
    return status


def cmd_status(args: argparse.Namespace) -> int:
    """Summarise a run: progress, resumes, rollbacks, preemptions, errors, and storage against its plan."""
    from curry_train import remote_view

    if remote_view.is_remote(args.run_dir):
        return _on_remote("status", args.run_dir, lambda remote: _print(remote_view.status_lines(remote)))
    print(render_status(_history(args.run_dir)))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    """Compare two runs: how each went, the config keys that differ, and the losses at their common steps."""
    print(render_diff(_history(args.run_dir), _history(args.other_run_dir)))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    """List a run's committed checkpoints, with sizes and which one `latest` names, under its summary."""
    from curry_train import remote_view

    if remote_view.is_remote(args.run_dir):
        return _on_remote("ls", args.run_dir, lambda remote: _print(remote_view.ls_lines(remote)))
    store = RunDir(_run_dir(args.run_dir))
    print(render_status(read_run(store.path), with_history=False))
    latest = store.latest()
    for ckpt in store.list():
        manifest = store.manifest(ckpt)
        mark = "  <- latest" if ckpt == latest else ""
        contents = manifest.contents or "?"
        print(f"{ckpt.relpath:<52} step {ckpt.step:>8}  {contents:<6}  {human_bytes(manifest.total_bytes):>9}{mark}")
    print(f"disk usage (hard links counted once): {human_bytes(store.disk_usage())}")
    abandoned = store.abandoned()
    if abandoned:
        print(f"set aside by rollbacks (checkpoint.retention.abandoned_keep; `curry-train gc {args.run_dir}` removes):")
        for item in abandoned:
            print(f"  {item.relpath:<64} step {item.step:>8}  {human_bytes(item.nbytes):>9}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """Remove the checkpoints that rollbacks set aside (a dry run unless --yes)."""
    run_dir = _run_dir(args.run_dir)
    store = RunDir(run_dir)
    items = store.abandoned()
    total = sum(item.nbytes for item in items)
    for item in items:
        print(f"{item.relpath:<64} step {item.step:>8}  {human_bytes(item.nbytes):>9}")
    if not items:
        print(f"{run_dir}: nothing set aside")
        return 0
    if not args.yes:
        print(f"{len(items)} set-aside checkpoint(s), {human_bytes(total)}: dry run, nothing removed; add --yes")
        return 0
    latest = store.latest()
    with Journal(RunFiles(run_dir).journal) as journal:
        for item in items:
            journal.append(
                "delete",
                latest.step if latest else 0,
                role=item.role,
                path=item.relpath,
                bytes=store.remove_abandoned(item),
                reason="curry-train gc: set aside by a rollback",
            )
    print(f"removed {len(items)} set-aside checkpoint(s), {human_bytes(total)} (hard links shared with kept ones stay)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Plot train and dev loss against step for runs overlaid, with saves, resumes, rollbacks, deletions marked."""
    from curry_train.plot import PlotError, plot_runs

    try:
        plot_runs([_history(path) for path in args.run_dirs], args.output)
    except PlotError as err:
        print(f"curry-train plot: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a checkpoint's parameters (default: a run's best best-K) to safetensors or a Hugging Face directory."""
    from curry_train import remote_view
    from curry_train.checkpoint.remote import RemoteError, describe_error
    from curry_train.export import ExportError, export

    try:
        if remote_view.is_remote(args.checkpoint):
            # Downloaded (each file checked against the manifest) into a temporary run directory, then as a local one.
            with remote_view.fetched(args.checkpoint) as (local, config, source):
                result = export(local, args.output, args.format, args.dtype, args.config or config)
        else:
            result = export(args.checkpoint, args.output, args.format, args.dtype, args.config)
            source = str(result.checkpoint)
    except (ExportError, FileNotFoundError, RemoteError) as err:
        print(f"curry-train export: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"curry-train export: {args.checkpoint}: {describe_error(args.checkpoint, err)}", file=sys.stderr)
        return 2
    print(
        f"exported {source} -> {result.output}: {result.tensors} tensors, {result.params:,} parameters, "
        f"{human_bytes(result.bytes)}"
    )
    return 0


def _bad_is_1(found: tuple[list[str], int]) -> tuple[list[str], int]:
    lines, bad = found
    return lines, 1 if bad else 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Tokenize text files into train.bin, val.bin and their sidecars, for data=tokens."""
    # Imported here: numpy, tokenizers and the progress bars cost the other commands' start-up otherwise.
    from curry_train import prepare

    return prepare.main(args)


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-read every committed checkpoint and compare sizes and checksums with its manifest."""
    from curry_train import remote_view

    if remote_view.is_remote(args.run_dir):
        return _on_remote("verify", args.run_dir, lambda remote: _print(*_bad_is_1(remote_view.verify_lines(remote))))
    store = RunDir(_run_dir(args.run_dir))
    bad = 0
    for ckpt in store.list():
        problems = store.verify(ckpt)
        bad += bool(problems)
        print(f"{ckpt.relpath}: " + ("ok" if not problems else "; ".join(problems)))
    for path in store.unreadable():
        bad += 1
        print(f"{path.relative_to(store.path)}: no manifest.json: never committed or damaged; never resumed")
    dangling = store.dangling_latest()
    if dangling is not None:
        bad += 1
        print(f"latest: names {dangling}, which is not a committed checkpoint (the next start repairs the link)")
    return 1 if bad else 0


def compose_config(overrides: list[str]) -> tuple[Config, Path]:
    """The resolved config and run directory that training would use with the same overrides (the vocabulary of
    token files with a sidecar included)."""
    cfg, _ = from_command_line(overrides)
    return cfg, Path(cfg.run.root) / str(cfg.run.id)


def _config_error(err: Exception) -> int:
    print(f"curry-train: invalid config: {err}", file=sys.stderr)
    return 2


def cmd_plan(args: argparse.Namespace) -> int:
    """Storage, worst-case resume point and a recommended cadence for a config, before a run starts."""
    try:
        cfg, run_dir = compose_config(args.overrides)
        validate(cfg, args.world_size)
        plan = build_plan(
            cfg,
            model_size(cfg.model),
            args.world_size,
            run_dir,
            at_step=args.at_step,
            save_seconds=args.save_seconds,
            step_seconds=args.step_seconds,
            mtbf_hours=args.mtbf_hours,
        )
    except ConfigError as err:
        return _config_error(err)
    print(json.dumps(plan_json(plan), indent=2) if args.json else render_plan(plan))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "status": cmd_status,
    "ls": cmd_ls,
    "journal": cmd_journal,
    "diff": cmd_diff,
    "plot": cmd_plot,
    "export": cmd_export,
    "verify": cmd_verify,
    "gc": cmd_gc,
    "plan": cmd_plan,
    "prepare": cmd_prepare,
}


def _at_least(kind: type, low: float, strict: bool = True) -> Callable[[str], float]:
    """An argparse type: ``kind`` (int or float) above ``low`` (or at least ``low`` when not ``strict``)."""

    def parse(text: str) -> float:
        value = kind(text)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
        return value

    return parse


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `curry-train plan`; every other argument is a Hydra override, as for training."""
    p.add_argument(
        "--at-step",
        type=_at_least(int, 0, strict=False),
        help="worst-case resume point for a crash and a loss spike at this step",
    )
    p.add_argument("--save-seconds", type=_at_least(float, 0), help="time one save costs training (default: measured)")
    p.add_argument("--step-seconds", type=_at_least(float, 0), help="time one optimizer step takes (default: measured)")
    p.add_argument(
        "--mtbf-hours",
        type=_at_least(float, 0),
        help="prior mean time between failures (default: checkpoint.mtbf_hours, 24); the run's interruptions refine it",
    )
    p.add_argument("--world-size", type=_at_least(int, 0), default=1, help="number of ranks the run will use")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        help="a checkpoint directory, or a run directory (its best best-K, else latest); or the same on the remote: "
        "<checkpoint.remote>/<run-id>[/<role>/<checkpoint>]",
    )
    p.add_argument("-o", "--output", required=True, help="file (safetensors) or directory (hf) to write")
    p.add_argument("--format", default="safetensors", help="safetensors (default: one file) or hf (a directory)")
    p.add_argument("--dtype", help="cast: float32, bfloat16 (bf16) or float16 (fp16); default: as saved")
    p.add_argument("--config", help="config.yaml with the model section (default: the checkpoint's run's)")


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="text files or folders (the suffixes data=text reads)")
    p.add_argument("--out", required=True, type=Path, help="folder for train.bin, val.bin, sidecars, tokenizer.json")
    p.add_argument("--tokenizer", help="a tokenizer.json file; default: train a byte-level BPE on the train split")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the trained BPE (default 8192)")
    p.add_argument("--dev-fraction", type=float, default=0.05, help="share of files held out as dev (default 0.05)")
    p.add_argument(
        "--seq-len",
        type=int,
        default=1024,
        help="the data.seq_len you will train with: a split by file name that leaves either side without two "
        "windows of it holds out the tail of the tokens instead (default 1024)",
    )
    p.add_argument("--force", action="store_true", help="replace train.bin and val.bin already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def version() -> str:
    """The installed package's version (its metadata), or a note that this checkout is not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("curry-train")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curry-train", description=__doc__)
    parser.add_argument("--version", action="version", version=f"curry-train {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    # Listed for --help only: main() hands `run` and `rehearse` to their own modules before this parser sees them.
    sub.add_parser("run", help="train: torchrun underneath, the run's own exit status (curry-train run --help)")
    sub.add_parser(
        "rehearse",
        help="before a long run: a short run killed and resumed against a straight one, on your own config "
        "(curry-train rehearse --help)",
    )
    for name, fn in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0])
        if name == "plan":
            p.usage = "curry-train plan [options] [hydra overrides...], e.g. model=7b checkpoint=7b_default"
            add_plan_arguments(p)
            continue
        if name == "prepare":
            add_prepare_arguments(p)
            continue
        if name == "plot":
            p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="one or more run directories")
            p.add_argument("-o", "--output", required=True, help="the PNG file to write")
            continue
        if name == "export":
            add_export_arguments(p)
            continue
        where = "a run directory, e.g. runs/tiny-stdlib-1a2b3c4d"
        if name in ("ls", "status", "verify"):
            where += "; or a run on checkpoint.remote: <checkpoint.remote>/<run-id>, e.g. s3://bucket/runs/RUN_ID"
        p.add_argument("run_dir", help=where)
        if name == "journal":
            p.add_argument("--event", action="append", help="only these events (repeatable)")
        if name == "diff":
            p.add_argument("other_run_dir", help="the run directory to compare it with")
        if name == "gc":
            p.add_argument("--yes", action="store_true", help="remove them (without it: list what would go)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["run"]:
        # Its own parser: torchrun's options and Hydra overrides, which argparse would take for its own.
        from curry_train.launcher import main as run_main

        return run_main(args[1:])
    if args[:1] == ["rehearse"]:
        from curry_train.rehearse import main as rehearse_main

        return rehearse_main(args[1:])
    parser = build_parser()
    # parse_known_args lets Hydra overrides stand anywhere among the plan's options, as they do for training.
    args, rest = parser.parse_known_args(args)
    unknown = [a for a in rest if args.command != "plan" or a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = rest
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
