"""Chat with a checkpoint about an image: `python chat.py checkpoint=<dir> image=<file>` (interactive) or
`python chat.py checkpoint=<dir> image=<file> question="What is in the picture?"` (one answer). A Hydra app like
train.py (root config: configs/chat.yaml; logic: factory/eval/chat.py). User errors end with one message, exit 2."""
import sys

import hydra
from omegaconf import DictConfig

from factory.command_line import HydraApp, exit_on_unknown_overrides
from factory.config import register_resolvers

APP = HydraApp()


@hydra.main(config_path="configs", config_name="chat", version_base="1.3")
def main(cfg: DictConfig) -> None:
    APP.job_started()
    from factory.eval.chat import run_app  # torch + transformers only once a job runs (--help, --cfg stay quick)

    code = run_app(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    register_resolvers()
    exit_on_unknown_overrides(sys.argv[1:], "chat", "chat.py", "checkpoint=<dir> image=<file> [question=...]")
    APP.run(main)
