"""`tuner=adapter`: bottleneck adapters in series on the MLP of every decoder block (ours, no PEFT).

Each adapter is x ↦ x + U·act(D·x) with D: hidden→bottleneck and U: bottleneck→hidden, no biases, U zero-initialised
(so the model is unchanged at step 0). Adapters sit on the residual-width (hidden size D) side of each MLP projection:
  Phi:   on the input of fc1 and on the output of fc2                          → 2 adapters per layer
  Llama: on the input of gate_proj, on the input of up_proj, on the output of down_proj → 3 adapters per layer
Each adapter has 2·D·bottleneck parameters, which gives exactly the paper's counts (3B: 32·2·2·2560·256 = 83,886,080;
7B: 32·3·2·4096·256 = 201,326,592; 13B: 40·3·2·5120·256 = 314,572,800). Read "after fc1" in the paper as "at fc1":
an adapter on fc1's 10240-wide output would not give the published count.

The adapters are attached with forward (pre-)hooks on the projections and live as a child `adapter` of each
projection, so the LLM's own modules and parameter names stay unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
from torch import nn

from factory.errors import FactoryError
from factory.tuners.arch import hidden_size, llm_arch, llm_layers, module_device
from factory.tuners.base import Tuner, register_tuner
from factory.tuners.options import in_range, one_of

ACTIVATIONS: Dict[str, type] = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class BottleneckAdapter(nn.Module):
    """x + up(act(down(x))); runs in the dtype of its weights and returns x's dtype."""

    def __init__(self, hidden: int, bottleneck: int, activation: str = "tanh", dropout: float = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise FactoryError(f"tuner.activation={activation!r} is not supported; use one of {sorted(ACTIVATIONS)}.")
        self.down = nn.Linear(hidden, bottleneck, bias=False)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, hidden, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.down.weight.dtype)
        return (h + self.up(self.dropout(self.act(self.down(h))))).to(x.dtype)

    # hook entry points (bound methods, so deep copies of the model keep pointing at their own adapter)
    def on_input(self, module: nn.Module, args):
        return (self(args[0]),) + tuple(args[1:])

    def on_output(self, module: nn.Module, args, output):
        return self(output)


@dataclass(frozen=True)
class AdapterOptions:
    bottleneck: int = 256
    activation: str = "tanh"
    dropout: float = 0.0

    def check(self, tuner: str) -> None:
        in_range(tuner, "bottleneck", self.bottleneck, low=1)
        one_of(tuner, "activation", self.activation, tuple(ACTIVATIONS))
        in_range(tuner, "dropout", self.dropout, low=0, high=1, high_open=True)


@register_tuner
class AdapterTuner(Tuner):
    name = "adapter"
    Options = AdapterOptions

    def _sites(self, model: nn.Module):
        """(projection module, side) for every adapter position, in layer order."""
        arch = llm_arch(model.llm, self.name)
        sites = []
        for index, layer in enumerate(llm_layers(model.llm)):
            mlp = getattr(layer, arch.mlp, None)
            names = [(n, "input") for n in arch.mlp_in] + [(arch.mlp_out, "output")]
            for name, side in names:
                proj = getattr(mlp, name, None) if mlp is not None else None
                if not isinstance(proj, nn.Module):
                    raise FactoryError(
                        f"tuner=adapter expected decoder layer {index} to have {arch.mlp}.{name}; this LLM's layout "
                        f"differs from its architecture entry in factory/tuners/arch.py:ARCH_MODULES."
                    )
                sites.append((proj, side))
        return sites

    def is_attached(self, model: nn.Module) -> bool:
        return any(isinstance(getattr(proj, "adapter", None), BottleneckAdapter) for proj, _ in self._sites(model))

    def attach(self, model: nn.Module) -> None:
        hidden = hidden_size(model.llm)
        with torch.device(module_device(model.llm)):
            for proj, side in self._sites(model):
                adapter = BottleneckAdapter(hidden, self.options.bottleneck, self.options.activation,
                                            self.options.dropout)
                proj.add_module("adapter", adapter)
                if side == "input":
                    proj.register_forward_pre_hook(adapter.on_input)
                else:
                    proj.register_forward_hook(adapter.on_output)

    def mark_trainable(self, model: nn.Module) -> None:
        for proj, _ in self._sites(model):
            proj.adapter.requires_grad_(True)
