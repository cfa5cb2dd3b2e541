"""Evaluate a checkpoint: `python eval.py checkpoint=<dir> benchmark=<name> question_file=... image_folder=...
annotations=...`, a Hydra app like train.py (root config: configs/eval.yaml; groups `benchmark` and `debug`, e.g.
`debug=fast` for a quick development run; logic: factory/eval/cli.py). Add `analysis=imbalance` for the
modality-imbalance analysis. Launch with torchrun to shard the questions over several processes. The settings are
checked before the model loads; user errors end with one message and exit 2."""
import sys

import hydra
from omegaconf import DictConfig

from factory.command_line import HydraApp, comma_lists, exit_on_unknown_overrides
from factory.config import register_resolvers

APP = HydraApp()


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    APP.job_started()
    from factory.eval.cli import run_app  # torch + transformers only once a job runs (--help, --cfg stay quick)

    code = run_app(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    register_resolvers()
    sys.argv[1:] = comma_lists(sys.argv[1:])  # tasks=mmlu,hellaswag is a list, not a Hydra sweep
    exit_on_unknown_overrides(sys.argv[1:], "eval", "eval.py", "e.g. checkpoint=runs/x/instruct benchmark=pope")
    APP.run(main)
