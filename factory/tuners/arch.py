"""Per-architecture facts tuners need: projection names inside a decoder block, hidden size, decoder layers.

Which projection is "the key projection" or "the FFN down projection" is looked up by the LLM's architecture name
(`config.model_type`), never guessed from module-path substrings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from torch import nn

from factory.errors import FactoryError
from factory.model.llms import decoder_layers
from factory.model.loading import module_device  # noqa: F401  (one helper for every layer; tuners import it here)


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
            f"the architecture to factory/tuners/arch.py:ARCH_MODULES."
        )
    return ARCH_MODULES[model_type]


def hidden_size(llm: nn.Module) -> int:
    return int(llm_config(llm).hidden_size)


def llm_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder blocks of the LLM, through a PEFT wrapper too (factory.model.llms owns the lookup)."""
    return decoder_layers(llm)
