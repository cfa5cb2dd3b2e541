"""`tune.vision=lora`: PEFT LoRA injected in place into every nn.Linear of the vision encoder.

Options come from `tuner.vision_lora: {r, alpha, dropout}` (VisionLoraOptions). The adapter is named `vision_lora`
so that its parameters are told apart from a LoRA tuner on the LLM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from factory.errors import FactoryError
from factory.tuners.arch import module_device
from factory.tuners.options import in_range, parse_options

ADAPTER_NAME = "vision_lora"


@dataclass(frozen=True)
class VisionLoraOptions:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05

    def check(self, tuner: str) -> None:
        in_range(tuner, "vision_lora.r", self.r, low=1)
        in_range(tuner, "vision_lora.alpha", self.alpha, low=1)
        in_range(tuner, "vision_lora.dropout", self.dropout, low=0, high=1, high_open=True)


def vision_lora_options(values: Mapping[str, Any], tuner: str) -> VisionLoraOptions:
    return parse_options(VisionLoraOptions, values or {}, tuner, prefix="vision_lora.")


def _vision_linear_names(vision: nn.Module) -> list:
    # Every nn.Linear of the encoder, selected by type (not by name), addressed by its exact path.
    return [name for name, module in vision.named_modules() if isinstance(module, nn.Linear)]


def add_vision_lora(model: nn.Module, options: VisionLoraOptions) -> None:
    """Inject the LoRA layers once (a second call reuses them) and make exactly them trainable."""
    from peft import LoraConfig, inject_adapter_in_model  # peft is heavy: imported only when vision LoRA is used

    vision = model.vision
    if not any(ADAPTER_NAME in name for name, _ in vision.named_parameters()):
        targets = _vision_linear_names(vision)
        if not targets:
            raise FactoryError(
                f"tune.vision=lora found no nn.Linear in the vision encoder {type(vision).__name__}; use "
                f"tune.vision=full or frozen."
            )
        config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                            target_modules=targets, bias="none")
        with torch.device(module_device(vision)):
            inject_adapter_in_model(config, vision, adapter_name=ADAPTER_NAME)
    for name, param in vision.named_parameters():
        if "lora_" in name and ADAPTER_NAME in name:
            param.requires_grad_(True)
