"""LoRA, IA3 and OFT through PEFT (`peft.get_peft_model`), with the paper's settings as defaults.

The LLM is wrapped in place: `model.llm` becomes a `PeftModelForCausalLM` (factory.model.llms.decoder_layers sees
through it). Target modules are the projection names of the LLM's architecture (factory.tuners.arch.ARCH_MODULES,
chosen by `config.model_type`), or `target_modules` from the config when given:
  lora: every linear of the LLM (attention q/k/v/out and all MLP projections), never lm_head
  ia3:  k, v and the FFN down projection (fc2 | down_proj), the latter as a feed-forward module (scales its input)
  oft:  q, k, v with `blocks` diagonal blocks per layer

OFT and PEFT versions: the paper's count (3·D²/16 per layer) is peft 0.10's, which stored every block as a dense
b×b matrix. peft ≥ 0.16 stores only the b(b−1)/2 free entries of each skew-symmetric block (the Cayley transform
of a skew-symmetric S gives the orthogonal block), so the same 16-block OFT has 16·b(b−1)/2 parameters per module —
about half. Both describe the same family of rotations; docs/params.md lists both counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch
from torch import nn

from factory.errors import FactoryError
from factory.tuners.arch import llm_arch, module_device
from factory.tuners.base import Tuner, register_tuner
from factory.tuners.options import in_range, option_error

ModuleNames = Optional[Union[str, List[str]]]  # null: per LLM architecture; or module names inside a decoder layer


def _is_peft(llm: nn.Module) -> bool:
    return hasattr(llm, "peft_config") and hasattr(llm, "get_base_model")


class PeftTuner(Tuner):
    """Common path: build the PEFT config, wrap the LLM, train the PEFT parameters."""

    peft_type = ""

    def peft_config(self, model: nn.Module):
        raise NotImplementedError

    def targets(self, model: nn.Module, default: List[str]) -> List[str]:
        given = self.options.target_modules
        if given:
            return [given] if isinstance(given, str) else list(given)
        return default

    def is_attached(self, model: nn.Module) -> bool:
        return _is_peft(model.llm)

    def attach(self, model: nn.Module) -> None:
        from peft import get_peft_model  # peft is slow to import: only a PEFT tuner in use loads it

        config = self.peft_config(model)
        # Build the new adapter weights directly where the LLM lives (meta for counting: no memory, no init cost).
        with torch.device(module_device(model.llm)):
            try:
                model.llm = get_peft_model(model.llm, config)
            except ValueError as err:  # PEFT reports unmatched target modules as ValueError
                raise FactoryError(
                    f"PEFT could not apply tuner={self.name!r} to the LLM: {err} Check tuner.target_modules "
                    f"(names of nn.Linear modules inside a decoder layer, e.g. q_proj)."
                ) from None

    def mark_trainable(self, model: nn.Module) -> None:
        adapter = model.llm.active_adapter if hasattr(model.llm, "active_adapter") else "default"
        for name, param in model.llm.named_parameters():
            if f".{adapter}" in name and self.param_marker in name:
                param.requires_grad_(True)

    param_marker = ""

    def merge_for_export(self, model: nn.Module) -> None:
        """Fold the PEFT weights into the LLM and drop the wrapper (for export or fast inference)."""
        if not _is_peft(model.llm):
            raise FactoryError(f"tuner={self.name!r} is not attached to this model, so there is nothing to merge.")
        model.llm = model.llm.merge_and_unload()


@dataclass(frozen=True)
class LoraOptions:
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: ModuleNames = None

    def check(self, tuner: str) -> None:
        in_range(tuner, "r", self.r, low=1)
        in_range(tuner, "alpha", self.alpha, low=1)
        in_range(tuner, "dropout", self.dropout, low=0, high=1, high_open=True)


@register_tuner
class LoraTuner(PeftTuner):
    name = "lora"
    Options = LoraOptions
    param_marker = "lora_"

    def peft_config(self, model: nn.Module):
        from peft import LoraConfig  # peft is slow to import: only a PEFT tuner in use loads it

        opts = self.options
        default = llm_arch(model.llm, self.name).all_linear if not opts.target_modules else []
        return LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
                          target_modules=self.targets(model, default), bias="none", task_type="CAUSAL_LM")


@dataclass(frozen=True)
class IA3Options:
    target_modules: ModuleNames = None
    feedforward_modules: ModuleNames = None  # with explicit target_modules: which of them scale their input


@register_tuner
class IA3Tuner(PeftTuner):
    name = "ia3"
    Options = IA3Options
    param_marker = "ia3_"

    def peft_config(self, model: nn.Module):
        from peft import IA3Config  # peft is slow to import: only a PEFT tuner in use loads it

        if self.options.target_modules:
            targets = self.targets(model, [])
            feedforward = self.options.feedforward_modules or []
            feedforward = [feedforward] if isinstance(feedforward, str) else list(feedforward)
        else:
            arch = llm_arch(model.llm, self.name)
            targets, feedforward = [arch.key, arch.value, arch.mlp_out], [arch.mlp_out]
        return IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type="CAUSAL_LM")


@dataclass(frozen=True)
class OFTOptions:
    blocks: int = 16  # number of diagonal blocks (PEFT's `r`); the block size is in_features / blocks
    target_modules: ModuleNames = None
    module_dropout: float = 0.0
    coft: bool = False
    eps: float = 6e-5

    def check(self, tuner: str) -> None:
        in_range(tuner, "blocks", self.blocks, low=1)
        in_range(tuner, "module_dropout", self.module_dropout, low=0, high=1, high_open=True)
        if self.eps <= 0:
            raise option_error(tuner, "eps", self.eps, "a positive number")


@register_tuner
class OFTTuner(PeftTuner):
    name = "oft"
    Options = OFTOptions
    param_marker = "oft_"

    def peft_config(self, model: nn.Module):
        from peft import OFTConfig  # peft is slow to import: only a PEFT tuner in use loads it

        opts = self.options
        arch = None if opts.target_modules else llm_arch(model.llm, self.name)
        default = [arch.query, arch.key, arch.value] if arch else []
        # peft ≥ 0.16: `r` is the number of blocks and `oft_block_size` must then be 0 (exactly one may be set).
        return OFTConfig(r=opts.blocks, oft_block_size=0, target_modules=self.targets(model, default),
                         module_dropout=opts.module_dropout, coft=opts.coft, eps=opts.eps, task_type="CAUSAL_LM")

