"""Tune types per component and the two trivial LLM tuners (`frozen`, `full`).

apply_tuning freezes the whole model first, then each component is made trainable by its tune type:
  vision:    frozen | full | lora   (lora: PEFT LoRA injected into every nn.Linear of the encoder, in place)
  connector: frozen | full
  llm:       frozen | full | tuner  (tuner = the configured tuner, e.g. mores, lora, adapter)
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

from torch import nn

from factory.errors import FactoryError
from factory.registry import TUNERS
from factory.tuners.base import Tuner, module_device

TUNE_TYPES = {
    "vision": ("frozen", "full", "lora"),
    "connector": ("frozen", "full"),
    "llm": ("frozen", "full", "tuner"),
}

# Stage presets (the same values as configs/stage): stage 1 trains the connector only, stage 2 adds the tuner.
STAGE_TUNE = {
    "pretrain": {"vision": "frozen", "connector": "full", "llm": "frozen"},
    "instruct": {"vision": "frozen", "connector": "full", "llm": "tuner"},
}

# LoRA on the vision encoder (tune.vision=lora); override with `tuner.vision_lora: {r, alpha, dropout}`.
VISION_LORA_DEFAULTS = {"r": 16, "alpha": 32, "dropout": 0.05}
_VISION_ADAPTER = "vision_lora"


def check_tune(tune: Mapping[str, Any], where: str = "stage.<stage>.tune") -> Dict[str, str]:
    """Validate a `tune` mapping ({vision, connector, llm}) and return it as a plain dict; `where` names the key in
    error messages."""
    tune = dict(tune or {})
    unknown = sorted(set(tune) - set(TUNE_TYPES))
    missing = sorted(set(TUNE_TYPES) - set(tune))
    if unknown or missing:
        raise FactoryError(
            f"{where} must name exactly the components vision, connector and llm "
            f"(missing: {missing or 'none'}; unknown: {unknown or 'none'}). Example: "
            f"{{vision: frozen, connector: full, llm: tuner}}."
        )
    for component, value in tune.items():
        if value not in TUNE_TYPES[component]:
            raise FactoryError(
                f"{where}.{component}={value!r} is not a tune type for the {component}; use one of "
                f"{', '.join(TUNE_TYPES[component])}."
            )
    return {k: str(v) for k, v in tune.items()}


def _vision_linear_names(vision: nn.Module) -> list:
    # Every nn.Linear of the encoder, selected by type (not by name), addressed by its exact path.
    return [name for name, module in vision.named_modules() if isinstance(module, nn.Linear)]


def tune_vision(model: nn.Module, tune: str, lora: Mapping[str, Any]) -> None:
    if tune == "full":
        model.vision.requires_grad_(True)
    elif tune == "lora":
        import torch
        from peft import LoraConfig, inject_adapter_in_model

        vision = model.vision
        if not any(_VISION_ADAPTER in name for name, _ in vision.named_parameters()):
            options = {**VISION_LORA_DEFAULTS, **dict(lora or {})}
            targets = _vision_linear_names(vision)
            if not targets:
                raise FactoryError(
                    f"tune.vision=lora found no nn.Linear in the vision encoder {type(vision).__name__}; use "
                    f"tune.vision=full or frozen."
                )
            config = LoraConfig(r=int(options["r"]), lora_alpha=int(options["alpha"]),
                                lora_dropout=float(options["dropout"]), target_modules=targets, bias="none")
            with torch.device(module_device(vision)):
                inject_adapter_in_model(config, vision, adapter_name=_VISION_ADAPTER)
        for name, param in vision.named_parameters():
            if "lora_" in name and _VISION_ADAPTER in name:
                param.requires_grad_(True)


def tune_connector(model: nn.Module, tune: str) -> None:
    if tune == "full":
        model.connector.requires_grad_(True)


@TUNERS.register("frozen")
class FrozenTuner(Tuner):
    """`tuner=frozen`: the LLM is not trained (only the connector, as in stage 1)."""

    name = "frozen"


@TUNERS.register("full")
class FullTuner(Tuner):
    """`tuner=full`: full fine-tuning of every LLM parameter."""

    name = "full"

    def mark_trainable(self, model: nn.Module) -> None:
        model.llm.requires_grad_(True)
