"""Entry point: `python -m curry_train.train [overrides]` or `torchrun ... -m curry_train.train [overrides]`.

Thin on purpose: compose and validate the config, set up the process group, call `loop.train`; and when something
fails, say so in one line with an exit status that tells which kind of failure it was (see `failures.py`).
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import yaml

from curry_train import distributed, failures, loop
from curry_train.checkpoint.preemption import StopNow, ignore_stop_signals
from curry_train.checkpoint.resume import ResumeError
from curry_train.checkpoint.rollback import SpikeError
from curry_train.compose import from_command_line
from curry_train.config import ConfigError
from curry_train.data import check_data
from curry_train.init_source import check_source
from curry_train.journal import append_from_any_rank
from curry_train.watchdog import collective_timeout, hang_timeout

USAGE = """usage: python -m curry_train.train [group=option ...] [key=value ...] [+resume=latest|auto|PATH]
                                   [+init_from=SOURCE]
       torchrun --nproc_per_node=N -m curry_train.train ...

  group=option      model=tiny|small|1b|7b  data=stdlib|text|tokens  checkpoint=default|7b_default ...
  key=value         any config key, e.g. train.steps=500 checkpoint.rollback_every=50 spike.enabled=true
  +resume=latest    continue this run (auto: or start fresh when there is nothing to continue)
  +init_from=SOURCE start a new run from these weights: a checkpoint or run directory, an exported
                    .safetensors file, a Hugging Face Llama directory (init.optimizer, init.exclude=[...])
  +rollback_to=PATH roll this run back to one of its checkpoints (once; a requeue continues from latest)
  --cfg job         print the resolved config and stop

`curry-train run [torchrun options] ...` launches the same with torchrun and exits with the run's own status.

Exit status: 0 done (or stopped after a preemption save), 1 failure while training (traceback in
<run>/failures.log), 2 refused before anything changed (config, data, resume, a run directory in use),
3 a loss spike the run could not roll back from. See README.md."""


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(args):
        print(USAGE)
        return
    show = "--cfg" in args  # as Hydra's `--cfg job`: print the resolved config and stop
    if show:
        args = [a for i, a in enumerate(args) if a != "--cfg" and (i == 0 or args[i - 1] != "--cfg")]
    try:
        cfg, launch = from_command_line(args)
        if show:
            print(yaml.safe_dump(asdict(cfg), sort_keys=False), end="")
            return
        # Before the process group: a missing or misread data file exits 2 here, naming the key or the file.
        check_data(cfg.data, cfg.model.vocab_size)
        check_source(cfg, launch)  # +init_from: a source that does not fit the model exits 2 here, naming why
    except ConfigError as err:
        failures.exit_with(f"invalid config: {err}", failures.EXIT_REFUSED)
    distributed.die_with_launcher()
    # Set before the first collective: none waits much longer than the hang timeout (explicit, or its floor).
    env = distributed.init_distributed(cfg.train.device, collective_timeout(hang_timeout(cfg.train.hang_timeout_s)[0]))
    for note in launch.notes if env.rank == 0 else ():
        print(f"curry-train: {note}", flush=True)
    run_dir = Path(cfg.run.root) / str(cfg.run.id)
    try:
        loop.train(cfg, run_dir, env, launch)
    except ConfigError as err:
        failures.exit_with(f"invalid config: {err}", failures.EXIT_REFUSED, quiet=env.rank != 0)
    except failures.Refused as err:
        failures.exit_with(str(err), failures.EXIT_REFUSED, quiet=env.rank != 0)
    except ResumeError as err:
        failures.exit_with(f"cannot resume: {err}", failures.EXIT_REFUSED, quiet=env.rank != 0)
    except SpikeError as err:
        failures.exit_with(f"stopped on a loss spike: {err}", failures.EXIT_SPIKE, quiet=env.rank != 0)
    except StopNow as err:
        failures.exit_with(
            f"{err}; the last committed checkpoint is intact (+resume=latest)",
            failures.EXIT_FAILURE,
            quiet=env.rank != 0,
        )
    except Exception as err:
        # A failure of this rank, or of another that this rank noticed: one line, the traceback in the run
        # directory. No orderly shutdown of the process group: it would wait for ranks that may be gone.
        if failures.is_peer_failure(err):
            lost = env.lost_peer(err) or "another rank"
            line = f"rank {env.rank} stopped: lost {lost} ({failures.one_line(err)})"
            failures.record(err, env.rank, run_dir, line)
            failures.exit_with(line, failures.EXIT_FAILURE, quiet=env.world_size > 1)
        line = f"rank {env.rank} failed: {failures.one_line(err)}"
        log = failures.record(err, env.rank, run_dir, line)
        append_from_any_rank(run_dir, "error", rank=env.rank, reason=line)
        failures.exit_with(line + (f"; traceback in {log}" if log else ""), failures.EXIT_FAILURE)
    # Ignored at the OS level, not by a Python handler: Python restores the default action of the signals it
    # handled as it shuts down, and a late signal then would kill a launch that has finished into a failure.
    ignore_stop_signals()
    distributed.shutdown()
    failures.write_status(failures.EXIT_DONE, "finished, or stopped after a preemption save")


if __name__ == "__main__":
    main()
