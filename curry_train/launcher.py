"""`curry-train run [torchrun options] OVERRIDES...`: training under torchrun, with the run's own exit status.

Modelled on torchtune's `tune run`. Before any worker starts, the launcher composes and checks the config and the
data, and on a single-node launch the run directory too (in use, not writable, already holding a run this launch
did not ask to continue, an unreadable `+resume=PATH`): a refusal is one line and status 2, and no torchrun starts.
On a multi-node launch the node that will host rank 0 is known only after torchrun's rendezvous, so rank 0 itself
checks the run directory there (status 2 as well, and every node ends within seconds as its peers leave).

Then it runs torchrun as a child and exits with what the workers recorded (see `failures.write_status`), not with
torchrun's 1: 0 done or stopped after a preemption save, 1 a failure (requeue), 2 refused (never requeue), 3 a loss
spike the run could not roll back from. torchrun's own log (its `ChildFailedError` report included) goes to a file,
kept in the run's failures.log when the run failed.

Signals: SIGTERM, SIGINT and SIGUSR1 reach the workers from the launcher, not through torchrun, which ignores them.
torchrun would turn them into a SIGKILL after its shutdown timeout (killing a preemption save), and a SIGUSR1 kills
torchrun itself unless it was told to handle it. The first signal asks every worker to finish its step, save and
stop; a second stops them at once; a third kills torchrun and its workers.

`python -m curry_train.launcher TORCHRUN_ARGS` is the child: torchrun, with its log in the status folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from curry_train import failures
from curry_train.layout import RunFiles

USAGE = """usage: curry-train run [torchrun options] [group=option ...] [key=value ...] [+resume=latest|auto|PATH]

  curry-train run --nproc-per-node=8 checkpoint=7b_default model=7b data=tokens data.path=...
  curry-train run --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=JOB ...

Every argument that is not a torchrun option is a Hydra override, as for `python -m curry_train.train`.
Without --nnodes > 1, --rdzv-endpoint or --master-addr the launch is --standalone (one node).

Exit status (the run's own, not torchrun's):
  0  finished, or stopped after a preemption save     (a job script is done; requeue only if it asked to stop)
  1  a failure while training, a lost rank or a hang  (requeue: the relaunch resumes with +resume=auto)
  2  refused before anything changed                  (never requeue: the same command fails the same way)
  3  a loss spike the run could not roll back from    (never requeue: look at the data and the lr)"""

# torchrun's options the launcher passes on: name -> how its value is checked (None: a flag without a value).
# `-m` and the script are the launcher's; signal handling is the launcher's (--signals-to-handle says which it
# passes to the workers).
_INT = r"\d+"
OPTIONS: dict[str, str | None] = {
    "nnodes": r"\d+(:\d+)?",
    "nproc-per-node": r"\d+|auto|cpu|gpu|xpu",
    "node-rank": _INT,
    "rdzv-backend": r".+",
    "rdzv-endpoint": r".+",
    "rdzv-id": r".+",
    "rdzv-conf": r".+",
    "standalone": None,
    "master-addr": r".+",
    "master-port": _INT,
    "local-addr": r".+",
    "max-restarts": _INT,
    "monitor-interval": r"\d+(\.\d*)?",
    "start-method": r"spawn|fork|forkserver",
    "log-dir": r".+",
    "redirects": r".+",
    "tee": r".+",
    "local-ranks-filter": r".+",
    "shutdown-timeout": _INT,
    "signals-to-handle": r"SIG[A-Z0-9]+(,SIG[A-Z0-9]+)*",
}
FORWARDED = ("SIGTERM", "SIGINT", "SIGUSR1")  # asks the workers to save and stop (preemption.py)
_FORWARDED_ENV = "CURRY_TRAIN_FORWARDED_SIGNALS"  # tells the child which signals torchrun must leave alone
TORCHRUN_LOG = "torchrun.log"
TORCHRUN_FAILURES = "torchrun.json"


class LaunchError(ValueError):
    """A command line the launcher cannot run: an unknown option or a bad value (exit 2)."""


def parse_options(argv: list[str], own: dict[str, str | None] | None = None) -> tuple[dict[str, str | None], list[str]]:
    """torchrun's options (`--name=value`, `--name value`, `--name_with_underscores` alike) and the overrides.

    `own`: a command's own options besides torchrun's (name -> value pattern, None for a flag), returned among
    them (`curry-train rehearse` takes them out)."""
    known = {**OPTIONS, **(own or {})}
    options: dict[str, str | None] = {}
    overrides: list[str] = []
    args = iter(argv)
    for arg in args:
        if not arg.startswith("-"):
            overrides.append(arg)
            continue
        name, has_value, value = arg.lstrip("-").partition("=")
        name = name.replace("_", "-")
        if name not in known:
            mine = f"its own options: {', '.join(f'--{n}' for n in own)}; " if own else ""
            torchrun = ", ".join(f"--{n}" for n in OPTIONS)
            raise LaunchError(f"unknown option {arg.split('=')[0]}; {mine}the torchrun options it knows: {torchrun}")
        pattern = known[name]
        if pattern is None:
            if has_value:
                raise LaunchError(f"--{name} takes no value, got {arg}")
            options[name] = None
            continue
        if not has_value:
            value = next(args, None)
            if value is None:
                raise LaunchError(f"--{name} needs a value: --{name}=VALUE")
        if not re.fullmatch(pattern, value):
            expected = "a whole number" if pattern == _INT else pattern.replace("|", " or ")
            raise LaunchError(f"--{name}={value}: not a valid value (expected {expected})")
        if name == "signals-to-handle" and not set(value.split(",")) <= set(signal.Signals.__members__):
            raise LaunchError(f"--{name}={value}: not a list of signal names (e.g. SIGTERM,SIGINT,SIGUSR1)")
        options[name] = value
    return options, overrides


def single_node(options: dict[str, str | None]) -> bool:
    return options.get("nnodes", "1") in ("1", "1:1")


def torchrun_arguments(options: dict[str, str | None]) -> list[str]:
    """torchrun's command line: the options as given (minus the launcher's own), `--standalone` when no rendezvous
    is given."""
    if not single_node(options) and not ({"rdzv-endpoint", "master-addr"} & set(options)):
        raise LaunchError(
            f"--nnodes={options['nnodes']} needs a rendezvous: --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT "
            "--rdzv-id=JOB (or --master-addr=HOST --master-port=PORT --node-rank=N)"
        )
    args = [
        f"--{name}" if value is None else f"--{name}={value}"
        for name, value in options.items()
        if name not in ("signals-to-handle", "shutdown-timeout")
    ]
    if single_node(options) and not ({"rdzv-endpoint", "master-addr", "standalone"} & set(options)):
        args.insert(0, "--standalone")
    return args


def world_size(options: dict[str, str | None]) -> int | None:
    nnodes, nproc = options.get("nnodes", "1"), options.get("nproc-per-node", "1")
    if nnodes and nproc and nnodes.isdigit() and nproc.isdigit():
        return int(nnodes) * int(nproc)
    return None


# ------------------------------------------------------------------------------------------- before torchrun


def check_launch(options: dict[str, str | None], overrides: list[str]) -> Path:
    """The checks the workers would make first, made once here: config, data, the `+init_from` source and (single
    node) the run directory. Returns the run directory; raises ConfigError, Refused or ResumeError."""
    from curry_train.compose import from_command_line
    from curry_train.config import validate
    from curry_train.data import check_data
    from curry_train.init_source import check_source

    cfg, launch = from_command_line(overrides)
    size = world_size(options)
    if size is not None:
        validate(cfg, size)
    check_data(cfg.data, cfg.model.vocab_size)
    check_source(cfg, launch)
    run_dir = Path(cfg.run.root) / str(cfg.run.id)
    if single_node(options):
        check_run_dir(run_dir, launch, asdict(cfg))
    return run_dir


def check_run_dir(run_dir: Path, launch: Any, config: dict[str, Any]) -> None:
    """What rank 0 checks at start, without changing anything: the directory can be written, no launch holds it,
    and it holds no run this launch did not ask to continue (or `+resume=PATH` names a checkpoint)."""
    from curry_train.checkpoint.store import RunDir, RunLock
    from curry_train.config import ConfigError

    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run.root: cannot write the run directory {run_dir} ({existing} is not writable)")
    if run_dir.is_dir() and RunFiles(run_dir).lock.exists():
        lock = RunLock(run_dir)
        try:
            holder = lock.acquire()
        except OSError as err:
            why = failures.one_line(err)
            raise ConfigError(f"run.root: cannot write the run directory {run_dir} ({why})") from None
        lock.release()
        if holder is not None:
            raise failures.in_use(run_dir, holder)
    continuing = launch.rollback_to is None and launch.resume in ("latest", "auto")
    if continuing or (not run_dir.is_dir() and launch.resume is None and launch.rollback_to is None):
        return  # `latest` may need the tidying rank 0 does at start before it can be judged
    from curry_train.checkpoint.resume import find_resume_point

    find_resume_point(launch, RunDir(run_dir), config)


def refusal(options: dict[str, str | None], overrides: list[str]) -> tuple[str | None, Path | None]:
    """The one line that refuses this launch (None: go ahead), and the run directory."""
    from curry_train.checkpoint.resume import ResumeError
    from curry_train.config import ConfigError

    try:
        return None, check_launch(options, overrides)
    except ConfigError as err:
        return f"invalid config: {err}", None
    except failures.Refused as err:
        return str(err), None
    except ResumeError as err:
        return f"cannot resume: {err}", None


# ------------------------------------------------------------------------------------------------ the run


def children() -> dict[int, list[int]]:
    """parent pid -> the pids of its children, for every process now (Linux /proc)."""
    children_of: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):  # the process ended while we looked
            # The command name, in parentheses, may hold spaces: the fields after its closing one are fixed.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children_of.setdefault(int(fields[1]), []).append(int(entry.name))
    return children_of


def worker_pids(parent: int) -> list[int]:
    """The living processes whose parent is `parent` (torchrun's workers; one that ended and that torchrun has not
    reaped yet is not one)."""
    return [pid for pid in children().get(parent, []) if alive(pid)]


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants. torchrun starts each worker in a session of its own, so killing torchrun's
    process group would leave the workers training."""
    below = children()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(below.get(pid, []))
    return tree


def alive(pid: int) -> bool:
    """Whether `pid` is still running (a zombie, dead but not yet reaped, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_tree(root: int) -> None:
    """SIGKILL `root` and every process below it: a job killed outright, as a node failure would."""
    for pid in process_tree(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Forwarder:
    """The launcher's signal handling: the first and second stop signal go to the workers (save and stop; stop
    at once), a third kills torchrun and, through their parent-death signal, its workers. A signal that comes
    after the workers ended (they left their statuses in `folder`) changes nothing: torchrun is only exiting."""

    def __init__(self, agent: subprocess.Popen, names: list[str], folder: Path) -> None:
        self.agent, self.folder = agent, folder
        self.received = 0
        self.signals = [signal.Signals[n] for n in names]
        for sig in self.signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        workers = worker_pids(self.agent.pid)
        if not workers and read_records(self.folder):
            return
        self.received += 1
        name = signal.Signals(signum).name
        if self.received >= 3 or not workers:
            why = "a third stop signal" if workers else "before the workers started"
            print(f"curry-train: {name} {why}: ending torchrun and its workers now", file=sys.stderr, flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.agent.pid, signal.SIGKILL)
            return
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def retire(self) -> None:
        """torchrun has ended: from now on the stop signals are ignored. The default action instead would let a
        late second signal end the launcher by that signal while it reports the run's status."""
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)


def forwarded_signals(options: dict[str, str | None]) -> list[str]:
    return (options.get("signals-to-handle") or ",".join(FORWARDED)).split(",")


def start(options: dict[str, str | None], overrides: list[str], folder: Path, **popen: Any) -> subprocess.Popen:
    """Start torchrun (this module as a child) with the workers; they record their statuses in `folder`. `popen`:
    more arguments for subprocess.Popen (where the output goes)."""
    env = {**os.environ, failures.STATUS_DIR_ENV: str(folder), _FORWARDED_ENV: ",".join(forwarded_signals(options))}
    if options.get("shutdown-timeout"):
        # Read by every torchrun version, not only those with the option.
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(options["shutdown-timeout"])
    command = [sys.executable, "-m", "curry_train.launcher", *torchrun_arguments(options)]
    return subprocess.Popen([*command, "-m", "curry_train.train", *overrides], env=env, **popen)


def launch(options: dict[str, str | None], overrides: list[str], run_dir: Path | None) -> int:
    """Run torchrun with the workers; returns the run's exit status. For the launcher's own process: it takes over
    the stop signals for good."""
    with tempfile.TemporaryDirectory(prefix="curry-train-run-") as folder:
        agent = start(options, overrides, Path(folder))
        forwarder = Forwarder(agent, forwarded_signals(options), Path(folder))
        try:
            code = agent.wait()
        finally:
            forwarder.retire()
        status, line = run_status(read_records(Path(folder)), read_failed(Path(folder)), code)
        if line:
            print(f"curry-train: {line}", file=sys.stderr, flush=True)
        if status != failures.EXIT_DONE and run_dir is not None:
            keep_torchrun_log(Path(folder) / TORCHRUN_LOG, run_dir, status)
    return status


def read_records(folder: Path) -> list[dict[str, Any]]:
    records = []
    for path in folder.glob("rank*"):
        with contextlib.suppress(OSError, ValueError):
            records.append(json.loads(path.read_text()))
    return records


def read_failed(folder: Path) -> list[dict[str, Any]]:
    path = folder / TORCHRUN_FAILURES
    with contextlib.suppress(OSError, ValueError):
        return list(json.loads(path.read_text()))
    return []


def run_status(records: list[dict[str, Any]], failed: list[dict[str, Any]], code: int) -> tuple[int, str | None]:
    """The run's exit status from what its workers recorded (`failures.write_status`) and the ranks torchrun saw
    fail (`failed`: rank, exitcode, signal), and the line the launcher says (None: a worker already said it).

    A worker that ended without a record (killed from outside, out of memory) counts as 1. The ranks that only
    stopped because another failed (`quiet`) say nothing about the cause: the others decide, highest status first,
    so a refusal on rank 0 is 2 even where other ranks saw a broken connection.
    """
    if records:
        last = max(r.get("restart", 0) for r in records)  # with --max-restarts, the last attempt's
        records = [r for r in records if r.get("restart", 0) == last]
    recorded = {r["rank"] for r in records}
    silent = [f for f in failed if f["rank"] not in recorded]
    expected = max((r.get("local_world_size", 1) for r in records), default=0)
    missing = max(len(silent), expected - len(records))
    causes = [r["status"] for r in records if not r.get("quiet")] + [failures.EXIT_FAILURE] * missing
    if causes:
        status = max(causes)
    elif records:
        status = max(r["status"] for r in records)
    else:
        status = failures.EXIT_DONE if code == 0 else failures.EXIT_FAILURE
    if status == failures.EXIT_DONE and code != 0:
        return failures.EXIT_FAILURE, f"torchrun exited {code} although its workers finished"
    if missing and not any(not r.get("quiet") for r in records):
        ends = [f"by {f['signal']}" if f.get("signal") else f"with status {f['exitcode']}" for f in silent]
        how = ", ".join(f"rank {f['rank']} (pid {f['pid']}) ended {end}" for f, end in zip(silent, ends, strict=True))
        return status, f"{how or f'{missing} worker(s) ended'} without a word (killed from outside? out of memory?)"
    return status, None


def keep_torchrun_log(log: Path, run_dir: Path, status: int) -> None:
    """Append torchrun's own log to the run's failures.log (where the ranks' tracebacks are)."""
    if not run_dir.is_dir() or not log.exists() or log.stat().st_size == 0:
        return
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    with contextlib.suppress(OSError), open(RunFiles(run_dir).failures, "a", encoding="utf-8") as f:
        f.write(f"--- {stamp} torchrun on {socket.gethostname()} (curry-train run, exit status {status})\n")
        f.write(log.read_text(errors="replace") + "\n")


def main(argv: list[str]) -> int:
    """`curry-train run ...`: returns the exit status."""
    if {"-h", "--help"} & set(argv):
        print(USAGE)
        return 0
    try:
        options, overrides = parse_options(argv)
        torchrun_arguments(options)  # a missing rendezvous refuses here, before anything is composed
    except LaunchError as err:
        print(f"curry-train run: {err}", file=sys.stderr)
        return failures.EXIT_REFUSED
    line, run_dir = refusal(options, overrides)
    if line is not None:
        print(f"curry-train: {line}", file=sys.stderr, flush=True)
        return failures.EXIT_REFUSED
    return launch(options, overrides, run_dir)


# --------------------------------------------------------------------------------------- the child: torchrun


def die_with_parent() -> None:
    """SIGKILL this process when the launcher dies (its workers follow: they die with torchrun)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def run_torchrun(argv: list[str]) -> int:
    """torchrun, quiet: its log and its failure report in the status folder, the forwarded signals left to the
    launcher. Returns 1 when a worker or torchrun failed."""
    die_with_parent()
    folder = Path(os.environ[failures.STATUS_DIR_ENV])
    forwarded = os.environ.get(_FORWARDED_ENV, ",".join(FORWARDED)).split(",")
    for name in forwarded:
        # A handler that does nothing, not SIG_IGN: the workers torchrun starts must not inherit an ignored signal.
        signal.signal(signal.Signals[name], lambda signum, frame: None)
    from torch.distributed.run import parse_args

    handler = logging.FileHandler(folder / TORCHRUN_LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("torch.distributed", "py.warnings"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
    logging.captureWarnings(True)
    args = parse_args(argv)
    handled = ",".join(s for s in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if s not in forwarded)
    args.signals_to_handle = handled  # torch 2.13; older versions read only the environment
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = handled
    try:
        return run_and_report(args, folder)
    finally:
        # The workers are gone. Python puts back the default action of every signal it handled as its interpreter
        # exits, so a stop signal meant for them (a second SIGTERM to the job) would end torchrun with -15 there.
        for name in forwarded:
            signal.signal(signal.Signals[name], signal.SIG_IGN)


def run_and_report(args: Any, folder: Path) -> int:
    """torchrun's run; the ranks it saw fail go to the status folder."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    try:
        run(args)
    except ChildFailedError as err:
        logging.getLogger("torch.distributed").error("%s", err.format_msg())
        failed = [
            {
                "rank": rank,
                "pid": f.pid,
                "exitcode": f.exitcode,
                "signal": f.signal_name() if f.exitcode < 0 else None,
            }
            for rank, f in err.failures.items()
        ]
        (folder / TORCHRUN_FAILURES).write_text(json.dumps(failed))
        return failures.EXIT_FAILURE
    except Exception as err:  # a rendezvous that never completed, a lost store, ...
        logging.getLogger("torch.distributed").exception("torchrun failed")
        print(f"curry-train: torchrun failed: {failures.one_line(err)}", file=sys.stderr, flush=True)
        return failures.EXIT_FAILURE
    return failures.EXIT_DONE


if __name__ == "__main__":
    sys.exit(run_torchrun(sys.argv[1:]))
