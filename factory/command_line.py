"""The command lines of the Hydra apps eval.py and chat.py (configs/eval.yaml, configs/chat.yaml): every
`key=value` must name a setting of the root config or one of its groups, checked before Hydra composes, so a typo
ends in one message that lists the known keys (exit 2), and `compose_app` composes in-process exactly as the app
does (tests, notebooks: `factory.eval.cli.main([...])`)."""
from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, List, Optional

from omegaconf import DictConfig, OmegaConf

from factory.config import CONFIG_DIR, compose
from factory.errors import FactoryError

USER_ERROR = 2  # the exit code of every user error (bad override, bad config value, bad input file)


class HydraApp:
    """Runs the @hydra.main function of train.py / eval.py / chat.py. Hydra reports a bad override or an unknown
    config option in a few lines and exits 1 before the job starts: that is a user error (exit 2); an exit inside the
    job keeps its code. The job marks its start with `job_started()`."""

    def __init__(self) -> None:
        self.started = False

    def job_started(self) -> None:
        self.started = True

    def run(self, main: Callable[[], None]) -> None:
        try:
            main()
        except SystemExit as exit_:
            if exit_.code == 1 and not self.started:
                sys.exit(USER_ERROR)
            raise


LIST_KEYS = ("tasks",)  # keys whose value is a list of names (eval.py harness=lm_eval tasks=mmlu,hellaswag)


def comma_lists(argv: Iterable[str], keys: Iterable[str] = LIST_KEYS) -> List[str]:
    """`tasks=mmlu,hellaswag` → `tasks=[mmlu,hellaswag]`. Hydra reads an unbracketed comma list as a sweep and refuses
    it without --multirun ("Ambiguous value"); lm-eval users write task lists that way, so a list key takes it as a
    list. Bracketed or quoted values and multirun command lines (where a sweep is meant) are left as they are."""
    argv = list(argv)
    if any(arg in ("-m", "--multirun") for arg in argv):
        return argv
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in keys and "," in value and value[:1] not in "[('\"":
            arg = f"{key}=[{value}]"
        out.append(arg)
    return out


def exit_on_unknown_overrides(argv: Iterable[str], config_name: str, command: str, usage: str) -> None:
    """`check_overrides` for an app's real command line: one message and exit 2 on a bad argument."""
    try:
        check_overrides(argv, config_name, command, usage, flags_allowed=True)
    except FactoryError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR)


def root_groups(config_name: str) -> List[str]:
    """The config groups a root config's defaults list names (benchmark, debug...)."""
    raw = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{config_name}.yaml"), resolve=False) or {}
    names = []
    for entry in raw.get("defaults", []):
        key = next(iter(entry)) if isinstance(entry, dict) else str(entry)
        if key != "_self_" and not key.startswith("override "):
            names.append(key.split("@")[0])
    return names


def _known_key(node: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node.keys():  # `in node` is False for "???"
            return False
        node = node._get_node(part)
    return True


def check_overrides(argv: Iterable[str], config_name: str, command: str, usage: str,
                    flags_allowed: bool = False) -> None:
    """Every argument is `key=value` with a key of configs/<config_name>.yaml or a group option (`benchmark=pope`).
    `flags_allowed`: Hydra's own flags (--cfg job, -m, --help) pass through (the app's real command line)."""
    base = OmegaConf.load(CONFIG_DIR / f"{config_name}.yaml")
    settings = [k for k in base.keys() if k not in ("defaults", "hydra")]
    groups = root_groups(config_name)
    args = [str(a) for a in argv]
    if flags_allowed:
        args = [a for a in args if "=" in a and not a.startswith("-")]
    bad = [a for a in args if "=" not in a or a.startswith("-")]
    if bad:
        raise FactoryError(f"Arguments must be key=value ({usage}); got {bad}. Known keys: {', '.join(settings)}.")
    unknown = []
    for arg in args:
        key = arg.split("=", 1)[0].lstrip("+~")
        if key in groups or key.startswith(("hydra.", "hydra/")):
            continue
        if not _known_key(base, key):
            unknown.append(key)
    if unknown:
        extra = f"; groups: {', '.join(groups)} (configs/<group>/)" if groups else ""
        raise FactoryError(f"Unknown setting(s) {unknown} for {command}. Known keys: {', '.join(settings)}{extra} "
                           f"(see configs/{config_name}.yaml).")


def compose_app(argv: Iterable[str], config_name: str, command: str, usage: str) -> DictConfig:
    """The config `python <command> <argv>` runs with (checked arguments, Hydra composition, no job run)."""
    argv = comma_lists(argv)
    check_overrides(argv, config_name, command, usage)
    return compose(argv, config_name=config_name)


def missing_checkpoint(cfg: DictConfig, command: str) -> Optional[str]:
    if OmegaConf.is_missing(cfg, "checkpoint") or cfg.get("checkpoint") is None:
        return f"{command} needs checkpoint=<folder> (a <run_dir>/<stage> folder written by train.py)."
    return None
