"""Config validation in one place, before any work: `check_config(cfg)` (train.py calls it first; eval tools can
call it with their own groups).

* Unknown keys: a key of the checked groups that no YAML file of its group defines is an error (`+trainer.lr=0.5`,
  which Hydra itself suggests for a mistyped key, would otherwise be accepted and silently ignored). The known keys
  are read from the YAML files themselves (configs/<group>/*.yaml, experiment files included), so a key added to a
  group's YAML is known without touching this module. For `tuner` and `data` the known keys are those of the
  options with the same `name` (a LoRA run has no `tuner.rank`).
* Types and ranges: RULES, a small table for the keys that need more than "it exists".
Every problem found is listed in one FactoryError, each naming the key, the value and what is accepted.
"""
from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from omegaconf import DictConfig, OmegaConf

from factory.config import CONFIG_DIR
from factory.constants import PRECISIONS
from factory.errors import FactoryError
from factory.tuners import validate_tuner_options

CHECKED_GROUPS = ("trainer", "tuner", "data", "stage", "logger", "eval")
STAGES = ("pretrain", "instruct")

Rule = Callable[[Any], Optional[str]]  # value -> what is expected (None: fine)


def _number(lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False, hi_open: bool = False,
            integer: bool = False, nullable: bool = False) -> Rule:
    kind = "an integer" if integer else "a number"
    bounds = []
    if lo is not None:
        bounds.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        bounds.append(f"{'<' if hi_open else '<='} {hi:g}")
    expected = kind + (" " + " and ".join(bounds) if bounds else "") + (" (or null)" if nullable else "")

    def check(value: Any) -> Optional[str]:
        if value is None:
            return None if nullable else expected
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return expected
        if integer and not isinstance(value, int):
            return expected
        if isinstance(value, float) and not math.isfinite(value):
            return expected
        if lo is not None and (value <= lo if lo_open else value < lo):
            return expected
        if hi is not None and (value >= hi if hi_open else value > hi):
            return expected
        return None
    return check


def _boolean(nullable: bool = False) -> Rule:
    def check(value: Any) -> Optional[str]:
        return None if isinstance(value, bool) or (nullable and value is None) else "true or false"
    return check


def _choice(*options: str) -> Rule:
    def check(value: Any) -> Optional[str]:
        return None if value in options else "one of " + ", ".join(options)
    return check


def _precision(value: Any) -> Optional[str]:
    return _choice(*PRECISIONS)(value)


# Dotted key (`*` = one stage name) -> rule. Only keys present in the config are checked.
RULES: Dict[str, Rule] = {
    "seed": _number(lo=0, integer=True),
    "init": _choice("pretrained", "random", "meta"),
    "resume": _boolean(), "overwrite": _boolean(),
    "trainer.*.lr": _number(lo=0, lo_open=True),
    "trainer.*.epochs": _number(lo=0, lo_open=True),
    "trainer.*.global_batch_size": _number(lo=1, integer=True),
    "trainer.*.micro_batch_size": _number(lo=1, integer=True),
    "trainer.*.warmup_ratio": _number(lo=0, hi=1, hi_open=True),
    "trainer.*.weight_decay": _number(lo=0),
    "trainer.max_steps": _number(lo=1, integer=True, nullable=True),
    "trainer.max_length": _number(lo=1, integer=True),
    "trainer.max_grad_norm": _number(lo=0, nullable=True),
    "trainer.precision": _precision,
    "trainer.gradient_checkpointing": _boolean(),
    "trainer.num_workers": _number(lo=0, integer=True, nullable=True),
    "trainer.cpu_threads": _number(lo=1, integer=True, nullable=True),
    "trainer.log_every": _number(lo=1, integer=True, nullable=True),
    "trainer.save_every": _number(lo=1, integer=True, nullable=True),
    # tuner.* values: each tuner's typed options (factory/tuners/options.py) own them, see check_config below
    "data.seed": _number(integer=True),
    "data.generate": _boolean(),
    "data.image_first": _boolean(),
    "data.sizes.*": _number(lo=1, integer=True),
    "data.on_bad_sample": _choice("error", "skip"),
    "data.max_bad_fraction": _number(lo=0, hi=1),
    "data.max_aspect_ratio": _number(lo=1, nullable=True),
    "llm.trust_remote_code": _boolean(),
    "data.verify_images": _boolean(),
    "data.allow_outside_paths": _boolean(),
    "eval.enabled": _boolean(),
    "eval.batch_size": _number(lo=1, integer=True),
    "eval.max_new_tokens": _number(lo=1, integer=True, nullable=True),
    "eval.limit": _number(lo=1, integer=True, nullable=True),
}


# eval.py's settings (configs/eval.yaml), checked with check_eval_config.
EVAL_RULES: Dict[str, Rule] = {
    "batch_size": _number(lo=1, integer=True),
    "max_new_tokens": _number(lo=1, integer=True, nullable=True),
    "limit": _number(lo=1, integer=True, nullable=True),
    "merge_wait_s": _number(lo=0),
    "seed": _number(integer=True),
    "skip_missing_images": _boolean(),
    "allow_outside_paths": _boolean(),
    "trust_remote_code": _boolean(),
    "dtype": lambda v: (None if v in (None, "bf16", "bfloat16", "fp16", "float16", "fp32", "float32")
                        else "null or one of bf16, fp16, fp32"),
    "imbalance.num_samples": _number(lo=1, integer=True),
    "imbalance.max_new_tokens": _number(lo=1, integer=True),
    "imbalance.batch_size": _number(lo=1, integer=True),
}


# ------------------------------------------------------------------------------------------------ known keys
def _flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    """Every key path (inner dicts included) -> its value."""
    out: Dict[str, Any] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            out[path] = value
            out.update(_flatten(value, path + "."))
    return out


def _load_option(path: Path, seen: Tuple[Path, ...] = ()) -> Dict[str, Any]:
    """A group option's YAML as a plain dict, with the same-group files of its `defaults` list merged in."""
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    merged: Dict[str, Any] = {}
    for entry in raw.pop("defaults", None) or []:
        if isinstance(entry, str) and entry != "_self_" and (path.parent / f"{entry}.yaml").is_file():
            sibling = path.parent / f"{entry}.yaml"
            if sibling not in seen:
                merged = OmegaConf.to_container(OmegaConf.merge(merged, _load_option(sibling, seen + (path,))))
    return OmegaConf.to_container(OmegaConf.merge(merged, raw))


def _group_options(config_dir: str, group: str) -> Tuple[Tuple[str, Tuple[Tuple[str, Any], ...]], ...]:
    """(option file stem, its flattened keys) for every YAML file of a group, plus the group's part of every
    experiment file (`# @package _global_`)."""
    folder = Path(config_dir) / group
    options = []
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        options.append((path.stem, tuple(_flatten(_load_option(path)).items())))
    for path in sorted((Path(config_dir) / "experiment").glob("*.yaml")):
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
        if isinstance(raw.get(group), dict):
            options.append((f"experiment/{path.stem}", tuple(_flatten(raw[group]).items())))
    return tuple(options)


def known_keys(group: str, selected_name: Optional[str] = None, config_dir: Path = CONFIG_DIR) -> Dict[str, Any]:
    """Key path -> YAML value, over the group's options (only those named `selected_name` when any is)."""
    options = [dict(keys) for _, keys in _group_options(str(config_dir), group)]
    if selected_name is not None:
        named = [o for o in options if o.get("name") == selected_name]
        options = named or options
    known: Dict[str, Any] = {}
    for option in options:
        known.update(option)
    return known


def _root_keys(config_dir: Path, root_file: str = "train.yaml") -> Set[str]:
    raw = OmegaConf.to_container(OmegaConf.load(Path(config_dir) / root_file), resolve=False) or {}
    groups = {next(iter(e)) if isinstance(e, dict) else e for e in raw.pop("defaults", [])}
    raw.pop("hydra", None)
    return {str(g).split("/")[-1].split("@")[0] for g in groups
            if g != "_self_" and not str(g).startswith("override ")} | set(raw)


def _is_known(path: str, known: Dict[str, Any]) -> bool:
    if path in known:
        return True
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):  # below a key whose YAML value is not a mapping (null, list, {}): free
        prefix = ".".join(parts[:i])
        if prefix in known:
            value = known[prefix]
            return not isinstance(value, dict) or not value
    return False


def _suggest(path: str, known: Iterable[str]) -> List[str]:
    known = sorted(known)
    leaf = path.rsplit(".", 1)[-1]
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf and k != path]
    close = difflib.get_close_matches(path, known, n=3, cutoff=0.6)
    return list(dict.fromkeys(same_leaf + close))[:4]


# ------------------------------------------------------------------------------------------------ the check
def config_problems(cfg: DictConfig, groups: Iterable[str] = CHECKED_GROUPS, root: bool = True,
                    config_dir: Path = CONFIG_DIR, root_file: str = "train.yaml",
                    rules: Optional[Dict[str, Rule]] = None) -> List[str]:
    """Every problem of `cfg` as one sentence each. `root_file` (relative to config_dir) defines the root keys and
    `rules` the type table: defaults are train.py's; eval tools pass their own (e.g. eval.yaml)."""
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception as err:  # an interpolation that cannot be resolved
        return [f"the config cannot be resolved: {err}"]
    problems: List[str] = []
    if root:
        known_root = _root_keys(config_dir, root_file)
        for key in data:
            if key not in known_root:
                hint = _suggest(key, known_root)
                problems.append(f"`{key}` is not a setting (nothing reads it, it would be silently ignored)"
                                + (f"; did you mean {' or '.join(hint)}?" if hint else ".") +
                                f" Root settings: {', '.join(sorted(known_root))}.")
    for group in groups:
        node = data.get(group)
        if not isinstance(node, dict):
            continue
        name = node.get("name") if group in ("tuner", "data") else None
        known = known_keys(group, name, config_dir)
        where = f"{group} {name!r}" if name is not None else group
        for path in _flatten(node):
            if not _is_known(path, known):
                leaves = sorted(k for k, v in known.items() if not isinstance(v, dict))
                hint = [f"{group}.{k}" for k in _suggest(path, leaves)]
                problems.append(
                    f"`{group}.{path}` is not a setting of {where} (nothing reads it, it would be silently ignored)"
                    + (f"; did you mean {' or '.join(hint)}?" if hint else ".")
                    + f" Known keys: {', '.join(leaves[:30])}{' ...' if len(leaves) > 30 else ''}.")
    flat = {k: v for k, v in _flatten(data).items()}
    for pattern, rule in (RULES if rules is None else rules).items():
        for key in _matching(pattern, flat):
            expected = rule(flat[key])
            if expected is not None:
                value = flat[key]
                problems.append(f"`{key}` must be {expected}, got {value!r} ({type(value).__name__}).")
    tuner_keys_known = not any(p.startswith("`tuner.") for p in problems)
    if "tuner" in groups and isinstance(data.get("tuner"), dict) and tuner_keys_known:
        try:  # the tuner's own typed options (factory/tuners/options.py): the one place tuner values are checked
            validate_tuner_options(data["tuner"])
        except FactoryError as err:
            problems.append(str(err))
    return problems


def _matching(pattern: str, flat: Dict[str, Any]) -> List[str]:
    if "*" not in pattern:
        return [pattern] if pattern in flat else []
    head, tail = pattern.split("*", 1)
    return [k for k in flat if k.startswith(head) and k.endswith(tail) and "." not in k[len(head):len(k) - len(tail)]]


def check_config(cfg: DictConfig, groups: Iterable[str] = CHECKED_GROUPS, root: bool = True,
                 config_dir: Path = CONFIG_DIR, root_file: str = "train.yaml",
                 rules: Optional[Dict[str, Rule]] = None) -> None:
    """Raise one FactoryError listing every unknown key and every value of the wrong type or out of range."""
    problems = config_problems(cfg, groups, root, config_dir, root_file, rules)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise FactoryError(
            f"The config has {len(problems)} problem{'s' if len(problems) > 1 else ''}; nothing was run:\n{listed}\n"
            f"Fix them on the command line (key=value) or in the YAML files under {config_dir}."
        )


def check_eval_config(cfg: DictConfig, defaults_file: Path = CONFIG_DIR / "eval.yaml") -> None:
    """eval.py's settings: the keys of its root config (configs/eval.yaml) and EVAL_RULES."""
    check_config(cfg, groups=(), root=True, config_dir=Path(defaults_file).parent,
                 root_file=Path(defaults_file).name, rules=EVAL_RULES)
