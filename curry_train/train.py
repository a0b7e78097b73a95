"""Entry point: `python -m curry_train.train [overrides]` or `torchrun ... -m curry_train.train [overrides]`.

Thin on purpose: compose and validate the config, set up the process group, call `loop.train`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from curry_train import distributed, loop
from curry_train.config import ConfigError, resolve
from curry_train.data import check_data


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(raw: DictConfig) -> None:
    try:
        cfg, resume = resolve(raw)
        # Before the process group: a missing or misread data file exits 2 here, naming the key or the file.
        check_data(cfg.data, cfg.model.vocab_size)
    except ConfigError as err:
        print(f"curry-train: invalid config: {err}", file=sys.stderr)
        sys.exit(2)
    env = distributed.init_distributed(cfg.train.device)
    try:
        loop.train(cfg, Path(cfg.run.root) / str(cfg.run.id), env, resume=resume)
    except ConfigError as err:
        print(f"curry-train: invalid config: {err}", file=sys.stderr)
        sys.exit(2)
    except loop.ResumeError as err:
        print(f"curry-train: cannot resume: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
