"""Tuners: what is trained in each stage.

    report = apply_tuning(model, cfg.tuner, tune={"vision": "frozen", "connector": "full", "llm": "tuner"})

freezes the whole LlavaModel, then makes each component trainable per its tune type (factory.tuners.freeze); with
llm=tuner the configured tuner (TUNERS registry: frozen, full, mores, lora, ia3, oft, adapter) is attached to
`model.llm` (once: calling apply_tuning again — e.g. stage 2 after stage 1, or when reloading — reuses it).
The report counts trainable parameters per component; `trainable_llm` counts only parameters inside the LLM, which
is the paper's TP*.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from torch import nn

from factory.errors import FactoryError
from factory.registry import TUNERS
from factory.tuners import adapter, freeze, mores, peft_tuners  # noqa: F401  (registers the tuners)
from factory.tuners.base import Tuner
from factory.tuners.freeze import STAGE_TUNE, check_tune, tune_connector, tune_vision


def _plain(cfg: Any) -> Dict[str, Any]:
    if cfg is None:
        return {"name": "frozen"}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a hard dependency
        pass
    return dict(cfg)


def build_tuner(tuner_cfg: Any) -> Tuner:
    """The TUNERS entry named by tuner_cfg.name, constructed with the remaining options (validated)."""
    cfg = _plain(tuner_cfg)
    cfg.pop("vision_lora", None)
    if "name" not in cfg:
        raise FactoryError("The tuner config has no `name` key; pick a file from configs/tuner (e.g. tuner=mores).")
    return TUNERS.get(cfg["name"])(cfg)


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
    report = {
        "trainable_llm": count_parameters(model.llm, True),
        "trainable_connector": count_parameters(model.connector, True),
        "trainable_vision": count_parameters(model.vision, True),
        "trainable_total": count_parameters(model, True),
        "total": count_parameters(model),
    }
    return report


def apply_tuning(model: nn.Module, tuner_cfg: Any, tune: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """Freeze everything, then train each component per `tune` (default: the instruct stage). Returns the report
    {tuner, tune, trainable_llm (TP*), trainable_connector, trainable_vision, trainable_total, total}."""
    tune = check_tune(tune if tune is not None else STAGE_TUNE["instruct"])
    plain = _plain(tuner_cfg)
    tuner = build_tuner(plain)
    model.requires_grad_(False)
    tune_vision(model, tune["vision"], plain.get("vision_lora") or {})
    tune_connector(model, tune["connector"])
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
        raise FactoryError("No tuner has been applied to this model (apply_tuning with tune.llm=tuner), nothing to merge.")
    TUNERS.get(name)({}).merge_for_export(model)
    model.applied_tuner = None
    return model


__all__ = ["apply_tuning", "build_tuner", "count_parameters", "merge_for_export", "tuning_report", "STAGE_TUNE"]
