"""LoRA, IA3 and OFT through PEFT (`peft.get_peft_model`), with the paper's settings as defaults.

The LLM is wrapped in place: `model.llm` becomes a `PeftModelForCausalLM` (factory.model.llms.decoder_layers sees
through it). Target modules are the projection names of the LLM's architecture (factory.tuners.base.ARCH_MODULES,
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

from typing import Any, Dict, List

import torch
from torch import nn

from factory.errors import FactoryError
from factory.registry import TUNERS
from factory.tuners.base import Tuner, llm_arch, module_device


def _is_peft(llm: nn.Module) -> bool:
    return hasattr(llm, "peft_config") and hasattr(llm, "get_base_model")


class PeftTuner(Tuner):
    """Common path: build the PEFT config, wrap the LLM, train the PEFT parameters."""

    peft_type = ""

    def peft_config(self, model: nn.Module):
        raise NotImplementedError

    def targets(self, model: nn.Module, default: List[str]) -> List[str]:
        given = self.cfg.get("target_modules")
        if given:
            return [str(x) for x in ([given] if isinstance(given, str) else given)]
        return default

    def is_attached(self, model: nn.Module) -> bool:
        return _is_peft(model.llm)

    def attach(self, model: nn.Module) -> None:
        from peft import get_peft_model

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


@TUNERS.register("lora")
class LoraTuner(PeftTuner):
    name = "lora"
    param_marker = "lora_"
    options = {"r": 128, "alpha": 256, "dropout": 0.05, "target_modules": None}

    def peft_config(self, model: nn.Module):
        from peft import LoraConfig

        default = llm_arch(model.llm, self.name).all_linear if not self.cfg.get("target_modules") else []
        return LoraConfig(r=int(self.cfg["r"]), lora_alpha=int(self.cfg["alpha"]), lora_dropout=float(self.cfg["dropout"]),
                          target_modules=self.targets(model, default), bias="none", task_type="CAUSAL_LM")


@TUNERS.register("ia3")
class IA3Tuner(PeftTuner):
    name = "ia3"
    param_marker = "ia3_"
    options = {"target_modules": None, "feedforward_modules": None}

    def peft_config(self, model: nn.Module):
        from peft import IA3Config

        if self.cfg.get("target_modules"):
            targets = self.targets(model, [])
            feedforward = self.cfg.get("feedforward_modules") or []
            feedforward = [feedforward] if isinstance(feedforward, str) else list(feedforward)
        else:
            arch = llm_arch(model.llm, self.name)
            targets, feedforward = [arch.key, arch.value, arch.mlp_out], [arch.mlp_out]
        return IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type="CAUSAL_LM")


@TUNERS.register("oft")
class OFTTuner(PeftTuner):
    name = "oft"
    param_marker = "oft_"
    options = {"blocks": 16, "target_modules": None, "module_dropout": 0.0, "coft": False, "eps": 6e-5}

    def peft_config(self, model: nn.Module):
        from peft import OFTConfig

        arch = None if self.cfg.get("target_modules") else llm_arch(model.llm, self.name)
        default = [arch.query, arch.key, arch.value] if arch else []
        # peft ≥ 0.16: `r` is the number of blocks and `oft_block_size` must then be 0 (exactly one may be set).
        return OFTConfig(r=int(self.cfg["blocks"]), oft_block_size=0, target_modules=self.targets(model, default),
                         module_dropout=float(self.cfg["module_dropout"]), coft=bool(self.cfg["coft"]),
                         eps=float(self.cfg["eps"]), task_type="CAUSAL_LM")


def peft_trainable_count(model: nn.Module) -> Dict[str, Any]:
    """PEFT's own count of trainable parameters (the number `print_trainable_parameters` shows)."""
    trainable, total = model.llm.get_nb_trainable_parameters()
    return {"trainable": int(trainable), "total": int(total)}
