"""The stage plan of a run: which stages run, in which order, with which template, tuning, data and trainer
settings. `stage.run` is [pretrain] | [instruct] | [pretrain, instruct] (configs/stage/*.yaml).

* pretrain (stage 1): `plain` template, only the connector trains (vision and LLM frozen), caption data.
* instruct (stage 2): the LLM's chat template, connector + the configured tuner on the LLM, conversation data.
  It starts from a finished stage-1 checkpoint: the previous stage of the same run, or `stage.init_from`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

from omegaconf import DictConfig, OmegaConf

from factory.errors import FactoryError
from factory.tuners import all_frozen, check_tune

STAGES = ("pretrain", "instruct")


@dataclass
class StageSpec:
    name: str
    template: str
    tune: Dict[str, str]
    data: Any        # {json, image_folder}
    hparams: Any     # {lr, epochs, global_batch_size, micro_batch_size, warmup_ratio, weight_decay}


def stage_names(cfg: DictConfig) -> List[str]:
    run = cfg.stage.get("run")
    names = [run] if isinstance(run, str) else list(run or [])
    if not names or any(n not in STAGES for n in names) or len(set(names)) != len(names):
        raise FactoryError(
            f"`stage.run` is {OmegaConf.to_container(run) if isinstance(run, DictConfig) else run!r}; it must list "
            f"stages from {list(STAGES)} once each, e.g. stage=all (both), stage=pretrain or stage=instruct."
        )
    return sorted(names, key=STAGES.index)


def tune_for_stage(cfg: DictConfig, stage: str) -> Dict[str, str]:
    """`stage.<stage>.tune`, a component left out being frozen, validated by the tuners' own table of tune types."""
    tune = all_frozen()
    tune.update((cfg.stage.get(stage) or {}).get("tune") or {})
    return check_tune(tune, where=f"stage.{stage}.tune")


def template_for_stage(cfg: DictConfig, stage: str) -> str:
    template = (cfg.stage.get(stage) or {}).get("template")
    if template is None:
        template = cfg.llm.get("template")
    if not template:
        raise FactoryError(
            f"No chat template for stage {stage!r}: set `stage.{stage}.template` or `llm.template` "
            "(plain, phi or vicuna_v1)."
        )
    return str(template)


def _data_for_stage(cfg: DictConfig, stage: str):
    node = cfg.data.get(stage)
    if node is None or not node.get("json"):
        raise FactoryError(
            f"The data config {cfg.data.get('name')!r} has no `data.{stage}.json`; set data.{stage}.json=<file> "
            f"and data.{stage}.image_folder=<folder> (LLaVA JSON/JSONL format)."
        )
    return node


def _hparams_for_stage(cfg: DictConfig, stage: str):
    node = cfg.trainer.get(stage)
    required = ("lr", "epochs", "global_batch_size", "micro_batch_size")
    missing = [k for k in required if node is None or node.get(k) is None]
    if missing:
        raise FactoryError(f"The trainer config lacks `trainer.{stage}.{missing[0]}` (needs {', '.join(required)}).")
    for key in ("global_batch_size", "micro_batch_size"):
        if int(node[key]) < 1:
            raise FactoryError(f"`trainer.{stage}.{key}` must be a positive integer, got {node[key]!r}.")
    if float(node.epochs) <= 0:
        raise FactoryError(f"`trainer.{stage}.epochs` must be > 0, got {node.epochs!r}.")
    return node


def plan_stages(cfg: DictConfig) -> List[StageSpec]:
    return [
        StageSpec(name=n, template=template_for_stage(cfg, n), tune=tune_for_stage(cfg, n),
                  data=_data_for_stage(cfg, n), hparams=_hparams_for_stage(cfg, n))
        for n in stage_names(cfg)
    ]


def gradient_accumulation(stage: str, global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """global = micro × world × accumulation, exactly (no silent rounding of the recipe)."""
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise FactoryError(
            f"`trainer.{stage}.global_batch_size`={global_batch_size} is not a multiple of micro_batch_size "
            f"({micro_batch_size}) × processes ({world_size}) = {per_step}. Change one of them so the global batch "
            "splits into whole micro-batches."
        )
    return global_batch_size // per_step
