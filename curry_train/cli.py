"""The `curry-train` command: small subcommands that read run directories (it never imports the loop)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from curry_train.checkpoint.plan import human_bytes
from curry_train.checkpoint.store import RunDir
from curry_train.journal import format_event, read_journal


def _run_dir(path: str) -> Path:
    p = Path(path)
    if not (p / "journal.jsonl").exists():
        raise SystemExit(f"curry-train: {p} is not a run directory (no journal.jsonl)")
    return p


def cmd_journal(args: argparse.Namespace) -> int:
    """Print a run's journal, one readable line per event."""
    for record in read_journal(_run_dir(args.run_dir) / "journal.jsonl"):
        if args.event and record["event"] not in args.event:
            continue
        print(format_event(record))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    """List a run's committed checkpoints, with sizes and which one `latest` names."""
    store = RunDir(_run_dir(args.run_dir))
    latest = store.latest()
    for ckpt in store.list():
        manifest = store.manifest(ckpt)
        mark = "  <- latest" if ckpt == latest else ""
        contents = manifest.extra.get("contents", "?")
        print(f"{ckpt.relpath:<52} step {ckpt.step:>8}  {contents:<6}  {human_bytes(manifest.total_bytes):>9}{mark}")
    print(f"disk usage (hard links counted once): {human_bytes(store.disk_usage())}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-read every committed checkpoint and compare sizes and checksums with its manifest."""
    store = RunDir(_run_dir(args.run_dir))
    bad = 0
    for ckpt in store.list():
        problems = store.verify(ckpt)
        bad += bool(problems)
        print(f"{ckpt.relpath}: " + ("ok" if not problems else "; ".join(problems)))
    return 1 if bad else 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "journal": cmd_journal,
    "ls": cmd_ls,
    "verify": cmd_verify,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curry-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0])
        p.add_argument("run_dir", help="a run directory, e.g. runs/tiny-stdlib-1a2b3c4d")
        if name == "journal":
            p.add_argument("--event", action="append", help="only these events (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
