"""Train a LLaVA-style model: `python train.py [group=option ...] [key=value ...]` (see configs/train.yaml).

Works as a plain process, under `torchrun`, and under the `deepspeed` launcher. The last line on stdout is a JSON
summary (run_dir, per-stage losses, micro-world accuracy, wall time). The config is validated before any work
(factory/config_checks.py). User errors end with one message and exit 2.
"""
import json
import os
import sys

import hydra
from omegaconf import DictConfig

from factory.command_line import USER_ERROR, HydraApp
from factory.config import register_resolvers
from factory.errors import FactoryError
from factory.train.hydra_folders import register_sweep_resolver

APP = HydraApp()


def _take_local_rank_argument(argv):
    """The deepspeed launcher appends `--local_rank=N`, which Hydra rejects as an override: move it to LOCAL_RANK."""
    kept, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ["LOCAL_RANK"] = arg.split("=", 1)[1]
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ["LOCAL_RANK"] = argv[i + 1]
            i += 1
        else:
            kept.append(arg)
        i += 1
    return kept


def _use_job_folder(cfg: DictConfig) -> None:
    """In a sweep (-m) every job trains in its own folder, <run_dir>/<job number>_<overrides> (configs/train.yaml):
    Hydra resolves run_dir once for the whole sweep, so without this every job would write into the same folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        with open_dict(cfg):
            cfg.run_dir = hydra_cfg.runtime.output_dir


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    APP.job_started()
    from factory.config_checks import check_config
    from factory.train import run  # heavy imports (torch, deepspeed) only once a job really runs

    _use_job_folder(cfg)
    try:
        check_config(cfg)
        summary = run(cfg)
    except FactoryError as err:
        print(f"Error: {err}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    sys.argv = [sys.argv[0]] + _take_local_rank_argument(sys.argv[1:])
    register_resolvers()
    register_sweep_resolver()
    APP.run(main)
