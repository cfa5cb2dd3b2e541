"""QLoRA: PEFT LoRA (the paper's r=128, α=256, dropout 0.05, every linear of the LLM) on a 4-bit base.

`tuner=qlora` quantizes every `nn.Linear` inside the LLM's decoder layers — exactly the layers LoRA adapts; the
embeddings and lm_head stay as they are, as in QLoRA and transformers' bitsandbytes loading — to bitsandbytes'
`Linear4bit` (NF4 by default, double quantization of the block constants, blocks of 64, compute in bf16), then wraps
the LLM with PEFT LoRA, which adapts 4-bit layers natively (peft.tuners.lora.bnb). The LoRA weights stay in full
precision and are the only LLM parameters that train; the checkpoint stores only them (trainable.safetensors), and
a reload quantizes the same pretrained weights again (NF4 quantization is deterministic) before loading them.

Quantization runs on the GPU of this process when there is one, else where the LLM is (bitsandbytes ≥ 0.48 has a
CPU backend: slower, but 4-bit forward and backward work there). On the meta device (`python -m factory.params`)
nothing is quantized: TP* counts only the LoRA weights, which 4-bit quantization does not change — the same count as
`tuner=lora`. The frozen 4-bit base holds the same number of weights (packed two per byte: PEFT's own count
multiplies a Params4bit's element count by 2) in about 0.52 bytes each with double quantization, instead of 2 in bf16.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, List

import torch
from torch import nn

from factory.errors import FactoryError
from factory.tuners.arch import llm_layers, module_device
from factory.tuners.base import register_tuner
from factory.tuners.options import one_of
from factory.tuners.peft_tuners import LoraOptions, LoraTuner

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# bitsandbytes' CPU backend, when imported on a CPU with AVX512-BF16, tries to fetch an optional 4-bit matmul kernel
# from the Hugging Face hub (through the `kernels` package) and logs a warning asking to install it when that fails;
# its own CPU kernels are then used, and they are what the tests run. peft imports bitsandbytes whenever it is
# installed, so every PEFT tuner would print that line: the factory downloads nothing from a hub, so it is silenced.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


@dataclass(frozen=True)
class QLoraOptions(LoraOptions):  # LoRA's r, alpha, dropout and target_modules, plus the 4-bit settings
    quant_type: str = "nf4"        # nf4 (QLoRA's NormalFloat4) | fp4
    double_quant: bool = True      # quantize the per-block absmax constants too (QLoRA's double quantization)
    compute_dtype: str = "bf16"    # dtype of the 4-bit layers' matmuls: bf16 | fp16 | fp32
    blocksize: int = 64            # weights per quantization block

    def check(self, tuner: str) -> None:
        super().check(tuner)
        one_of(tuner, "quant_type", self.quant_type, ("nf4", "fp4"))
        one_of(tuner, "compute_dtype", self.compute_dtype, tuple(COMPUTE_DTYPES))
        one_of(tuner, "blocksize", str(self.blocksize), ("32", "64", "128", "256", "512", "1024", "2048", "4096"))


def import_bitsandbytes() -> Any:
    """The bitsandbytes module, or a FactoryError that says how to get a working one."""
    try:
        import bitsandbytes  # optional and slow to import: only tuner=qlora on real weights needs it
    except Exception as err:  # ImportError, or a broken native library raising at import time
        raise FactoryError(
            f"tuner=qlora needs bitsandbytes (4-bit NF4 layers), which cannot be imported here: {type(err).__name__}: "
            f"{err}. Install it with `pip install 'bitsandbytes>=0.48,<0.51'` (as requirements.txt does; its wheels "
            "run on CUDA GPUs and on x86-64 CPUs), or pick tuner=lora, the same adapters on a 16-bit base."
        ) from None
    return bitsandbytes


def quantization_device(llm: nn.Module) -> torch.device:
    """This process's GPU when there is one (CUDA quantizes in milliseconds), else the LLM's own device."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return module_device(llm)


def quantize_linear(bnb: Any, linear: nn.Linear, opts: QLoraOptions, device: torch.device) -> nn.Module:
    """A bitsandbytes Linear4bit holding `linear`'s weight in 4 bits (and its bias as is), on `device`."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=COMPUTE_DTYPES[opts.compute_dtype],
                              compress_statistics=opts.double_quant, quant_type=opts.quant_type, device="meta")
    weight = bnb.nn.Params4bit(linear.weight.detach(), requires_grad=False, blocksize=opts.blocksize,
                               compress_statistics=opts.double_quant, quant_type=opts.quant_type, module=layer)
    layer.weight = weight.to(device)  # Params4bit quantizes on its first move to a real device
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    return layer


def quantize_llm(llm: nn.Module, opts: QLoraOptions, bnb: Any) -> List[str]:
    """Replace every nn.Linear of the decoder layers by its 4-bit version; returns their names."""
    device = quantization_device(llm)
    done = []
    for index, layer in enumerate(llm_layers(llm)):
        for name, child in list(layer.named_modules()):
            if type(child) is not nn.Linear:  # Linear4bit subclasses nn.Linear: a second attach leaves it alone
                continue
            parent_name, _, leaf = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            try:
                setattr(parent, leaf, quantize_linear(bnb, child, opts, device))
            except (RuntimeError, NotImplementedError, ValueError, AssertionError) as err:
                raise FactoryError(
                    f"bitsandbytes could not quantize layer {index} `{name}` to 4 bits on {device} "
                    f"({type(err).__name__}: {err}). bitsandbytes 4-bit layers run on CUDA GPUs and x86-64 CPUs; "
                    "on another device pick tuner=lora."
                ) from None
            done.append(f"{index}.{name}")
    return done


@register_tuner
class QLoraTuner(LoraTuner):
    """`tuner=qlora`: LoRA on the 4-bit NF4 LLM (see the module docstring)."""

    name = "qlora"
    Options = QLoraOptions

    def attach(self, model: nn.Module) -> None:
        if module_device(model.llm).type != "meta":  # counting on meta: the LoRA weights are all there is to count
            quantize_llm(model.llm, self.options, import_bitsandbytes())
        super().attach(model)

    def merge_for_export(self, model: nn.Module) -> None:
        raise FactoryError(
            "tuner=qlora cannot be merged into the LLM: its base weights are 4-bit, and merging would round the "
            "LoRA update into NF4. Export trainable.safetensors (the LoRA weights) with the tuner config, or train "
            "with tuner=lora to merge."
        )
