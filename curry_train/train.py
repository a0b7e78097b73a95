"""Entry point: `python -m curry_train.train [overrides]` or `torchrun ... -m curry_train.train [overrides]`.

Thin on purpose: compose and validate the config, set up the process group, call `loop.train`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from curry_train import distributed, loop
from curry_train.checkpoint.resume import SPIKE_EXIT_STATUS
from curry_train.config import ConfigError, config_dir, resolve
from curry_train.data import check_data


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def main(raw: DictConfig) -> None:
    try:
        cfg, launch = resolve(raw)
        # Before the process group: a missing or misread data file exits 2 here, naming the key or the file.
        check_data(cfg.data, cfg.model.vocab_size)
    except ConfigError as err:
        print(f"curry-train: invalid config: {err}", file=sys.stderr)
        sys.exit(2)
    env = distributed.init_distributed(cfg.train.device)
    try:
        loop.train(cfg, Path(cfg.run.root) / str(cfg.run.id), env, launch)
    except ConfigError as err:
        print(f"curry-train: invalid config: {err}", file=sys.stderr)
        sys.exit(2)
    except loop.ResumeError as err:
        print(f"curry-train: cannot resume: {err}", file=sys.stderr)
        sys.exit(2)
    except loop.SpikeError as err:
        print(f"curry-train: stopped on a loss spike: {err}", file=sys.stderr)
        sys.exit(SPIKE_EXIT_STATUS)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
