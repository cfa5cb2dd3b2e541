"""Chat with a checkpoint about an image: `python chat.py checkpoint=<dir> image=<file>` (interactive) or
`python chat.py checkpoint=<dir> image=<file> question="What is in the picture?"` (one answer). A Hydra app like
train.py (root config: configs/chat.yaml; logic: factory/eval/chat.py). User errors end with one message, exit 2."""
import sys

import hydra
from omegaconf import DictConfig

from factory.command_line import check_overrides
from factory.config import register_resolvers
from factory.errors import FactoryError

USER_ERROR = 2
_job_started = False  # tells a config error from Hydra (before the job) apart from an error inside the job


@hydra.main(config_path="configs", config_name="chat", version_base="1.3")
def main(cfg: DictConfig) -> None:
    global _job_started
    _job_started = True
    from factory.eval.chat import run_app  # torch + transformers only once a job runs (--help, --cfg stay quick)

    code = run_app(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    register_resolvers()
    try:
        check_overrides(sys.argv[1:], "chat", "chat.py", "checkpoint=<dir> image=<file> [question=...]",
                        flags_allowed=True)
    except FactoryError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR)
    try:
        main()
    except SystemExit as exit_:
        # Hydra reports a bad override / unknown option in a few lines and exits 1; that is a user error.
        if exit_.code == 1 and not _job_started:
            sys.exit(USER_ERROR)
        raise
