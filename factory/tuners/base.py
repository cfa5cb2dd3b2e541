"""The tuner protocol and the per-architecture facts tuners need.

A tuner changes only the LLM (`model.llm`): it attaches its own modules (MoReS interventions, PEFT layers, adapters)
and marks exactly its own parameters trainable. Freezing everything else and counting parameters is done once, in
`factory.tuners.apply_tuning`. Which projection is "the key projection" or "the FFN down projection" is looked up
by the LLM's architecture name (`config.model_type`), never guessed from module-path substrings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Tuple

import torch
from torch import nn

from factory.errors import FactoryError


@dataclass(frozen=True)
class ArchModules:
    """Names (attribute names inside one decoder layer) of the projections of an LLM architecture."""

    query: str
    key: str
    value: str
    attn_out: str
    mlp: str  # attribute of the decoder layer holding the feed-forward block
    mlp_in: Tuple[str, ...]  # projections D -> FFN inside the MLP (fc1 | gate_proj, up_proj)
    mlp_out: str  # projection FFN -> D inside the MLP (fc2 | down_proj)

    @property
    def all_linear(self) -> list:
        return [self.query, self.key, self.value, self.attn_out, *self.mlp_in, self.mlp_out]


_PHI = ArchModules("q_proj", "k_proj", "v_proj", "dense", "mlp", ("fc1",), "fc2")
_LLAMA = ArchModules("q_proj", "k_proj", "v_proj", "o_proj", "mlp", ("gate_proj", "up_proj"), "down_proj")

# Keyed by the HF `model_type` of the LLM (vicuna checkpoints are `llama`). Add an architecture here, or set the
# tuner's `target_modules` explicitly, to tune an LLM not listed.
ARCH_MODULES: Dict[str, ArchModules] = {
    "phi": _PHI,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
}


def llm_config(llm: nn.Module):
    """The HF config of the LLM (also through a PEFT wrapper); the text config for composite configs."""
    config = getattr(llm, "config", None)
    if config is None:
        raise FactoryError(
            f"The LLM ({type(llm).__name__}) has no `config` attribute, so its hidden size and architecture cannot be "
            f"read. Load the LLM through one of the registered `llm` builders (factory.model.llms)."
        )
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def llm_arch(llm: nn.Module, tuner: str) -> ArchModules:
    model_type = getattr(llm_config(llm), "model_type", None)
    if model_type not in ARCH_MODULES:
        raise FactoryError(
            f"tuner={tuner!r} does not know the projection names of LLM architecture {model_type!r} (known: "
            f"{', '.join(sorted(ARCH_MODULES))}). Set `tuner.target_modules` explicitly in the tuner config, or add "
            f"the architecture to factory/tuners/base.py:ARCH_MODULES."
        )
    return ARCH_MODULES[model_type]


def hidden_size(llm: nn.Module) -> int:
    return int(llm_config(llm).hidden_size)


def llm_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder blocks of the LLM, through a PEFT wrapper too (factory.model.llms owns the lookup)."""
    from factory.model.llms import decoder_layers

    return decoder_layers(llm)


def module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def set_trainable(params: Iterable[nn.Parameter]) -> None:
    for param in params:
        param.requires_grad_(True)


class Tuner:
    """Base class of the TUNERS registry entries.

    `options` lists every accepted config key (besides `name`) with its default; unknown keys are rejected so that a
    typo such as `tuner.rnak=2` fails loudly instead of silently training the default.
    """

    name = "base"
    options: Dict[str, Any] = {}

    def __init__(self, cfg: Mapping[str, Any]):
        cfg = dict(cfg)
        cfg.pop("name", None)
        unknown = sorted(set(cfg) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "(none)"
            raise FactoryError(
                f"The {self.name!r} tuner config has unknown key(s) {unknown}. Accepted keys: {known}. Fix the "
                f"override or configs/tuner/{self.name}.yaml."
            )
        self.cfg: Dict[str, Any] = {**self.options, **cfg}

    def is_attached(self, model: nn.Module) -> bool:
        """True when this tuner's modules are already in model.llm (apply_tuning is idempotent)."""
        return False

    def attach(self, model: nn.Module) -> None:
        """Add the tuner's modules to model.llm (may replace model.llm, e.g. by a PEFT wrapper)."""

    def mark_trainable(self, model: nn.Module) -> None:
        """Set requires_grad on the tuner's own parameters (everything is frozen before this is called)."""

    def merge_for_export(self, model: nn.Module) -> None:
        raise FactoryError(
            f"The {self.name!r} tuner cannot be merged into the LLM weights; export the trainable weights "
            f"(trainable.safetensors) together with the tuner config instead."
        )
