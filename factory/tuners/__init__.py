"""Tuners: what is trained in each stage.

    report = apply_tuning(model, cfg.tuner, tune={"vision": "frozen", "connector": "full", "llm": "tuner"})

freezes the whole LlavaModel, then makes each component trainable per its tune type (factory.tuners.tune_types);
with llm=tuner the configured tuner (TUNERS registry; `tuner_names()` lists them) is attached to `model.llm` (once:
calling apply_tuning again — e.g. stage 2 after stage 1, or when reloading — reuses it). The report counts trainable
parameters per component; `trainable_llm` counts only parameters inside the LLM, which is the paper's TP*.

Every module of this package is imported here (pkgutil), so a tuner registers itself just by living in a file of
the package: there is no import list to keep (docs/tuners.md, "Adding a tuner").
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Dict, List, Mapping, Optional

from omegaconf import DictConfig, OmegaConf
from torch import nn

from factory.errors import FactoryError
from factory.registry import TUNERS
from factory.tuners.adapter import BottleneckAdapter  # re-created on HF models by factory.hf
from factory.tuners.arch import llm_arch
from factory.tuners.base import Tuner
from factory.tuners.mores import MoReS  # re-created on HF models by factory.hf
from factory.tuners.tune_types import STAGES, TUNE_TYPES, check_tune, stage_tune
from factory.tuners.vision_lora import VisionLoraOptions, add_vision_lora, vision_lora_options

TUNER_MODULES: List[str] = [f"{__name__}.{info.name}" for info in pkgutil.iter_modules(__path__)]
for _module in TUNER_MODULES:
    importlib.import_module(_module)


def _plain(cfg: Any) -> Dict[str, Any]:
    if cfg is None:
        return {"name": "frozen"}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def tuner_names() -> List[str]:
    """The registered tuner names (the values `tuner.name` may take)."""
    return TUNERS.names()


def tune_types() -> Dict[str, tuple]:
    """{component: the tune types it accepts} (vision, connector, llm)."""
    return {component: tuple(types) for component, types in TUNE_TYPES.items()}


def stage_presets() -> Dict[str, Dict[str, str]]:
    """{stage: tune} of the two stages' defaults (the values of configs/stage)."""
    return {stage: stage_tune(stage) for stage in STAGES}


def all_frozen() -> Dict[str, str]:
    """{component: "frozen"} for every component a stage can tune: the base that `stage.<name>.tune` updates
    (the public face of the tune-type table, for the stage planner)."""
    return {component: "frozen" for component in TUNE_TYPES}


def build_tuner(tuner_cfg: Any) -> Tuner:
    """The TUNERS entry named by tuner_cfg.name, constructed with the remaining options (validated)."""
    cfg = _plain(tuner_cfg)
    cfg.pop("vision_lora", None)
    if "name" not in cfg:
        raise FactoryError("The tuner config has no `name` key; pick a file from configs/tuner (e.g. tuner=mores).")
    return TUNERS.get(cfg["name"])(cfg)


def validate_tuner_options(tuner_cfg: Any) -> Any:
    """Check the `tuner` config node (name, every option's key and type, `vision_lora`) without building a model;
    returns the tuner's typed options. Raises one FactoryError naming the bad key (config checks call this)."""
    plain = _plain(tuner_cfg)
    tuner = build_tuner(plain)
    vision_lora_options(plain.get("vision_lora") or {}, tuner.name)
    return tuner.options


def count_parameters(module: Optional[nn.Module], trainable_only: bool = False) -> int:
    if module is None:
        return 0
    seen = set()
    total = 0
    for param in module.parameters():  # parameters() already skips shared (tied) tensors
        if id(param) in seen or (trainable_only and not param.requires_grad):
            continue
        seen.add(id(param))
        total += param.numel()
    return total


def tuning_report(model: nn.Module) -> Dict[str, int]:
    return {
        "trainable_llm": count_parameters(model.llm, True),
        "trainable_connector": count_parameters(model.connector, True),
        "trainable_vision": count_parameters(model.vision, True),
        "trainable_total": count_parameters(model, True),
        "total": count_parameters(model),
    }


def apply_tuning(model: nn.Module, tuner_cfg: Any, tune: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """Freeze everything, then train each component per `tune` (default: the instruct stage). Returns the report
    {tuner, tune, trainable_llm (TP*), trainable_connector, trainable_vision, trainable_total, total}."""
    tune = check_tune(tune if tune is not None else stage_tune("instruct"))
    plain = _plain(tuner_cfg)
    tuner = build_tuner(plain)
    vision_lora: VisionLoraOptions = vision_lora_options(plain.get("vision_lora") or {}, tuner.name)
    model.requires_grad_(False)
    if tune["vision"] == "full":
        model.vision.requires_grad_(True)
    elif tune["vision"] == "lora":
        add_vision_lora(model, vision_lora)
    if tune["connector"] == "full":
        model.connector.requires_grad_(True)
    if tune["llm"] == "full":
        model.llm.requires_grad_(True)
    elif tune["llm"] == "tuner":
        applied = getattr(model, "applied_tuner", None)
        if applied is not None and applied != tuner.name:
            raise FactoryError(
                f"This model already carries tuner {applied!r}; it cannot also get tuner {tuner.name!r}. Build a "
                f"fresh model (factory.build_model) for another tuner."
            )
        if not tuner.is_attached(model):
            tuner.attach(model)
        model.applied_tuner = tuner.name
        tuner.mark_trainable(model)
    report: Dict[str, Any] = {"tuner": tuner.name, "tune": tune}
    report.update(tuning_report(model))
    return report


def merge_for_export(model: nn.Module) -> nn.Module:
    """Fold a mergeable tuner (lora, ia3, oft) into the LLM weights in place and return the model."""
    name = getattr(model, "applied_tuner", None)
    if name is None:
        raise FactoryError(
            "No tuner has been applied to this model (apply_tuning with tune.llm=tuner), so there is nothing to merge."
        )
    TUNERS.get(name)({}).merge_for_export(model)
    model.applied_tuner = None
    return model


__all__ = ["BottleneckAdapter", "MoReS", "llm_arch", "all_frozen", "apply_tuning", "build_tuner", "check_tune",
           "count_parameters", "merge_for_export",
           "stage_presets", "tune_types", "tuner_names", "tuning_report", "validate_tuner_options",
           "TUNER_MODULES"]
