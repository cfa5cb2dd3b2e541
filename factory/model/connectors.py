"""Connectors: map vision features [.., Dv] to the LLM's embedding width [.., D].

Builders are registered in factory.registry.CONNECTORS and called as ``builder(cfg_node, in_dim, out_dim)``:
  * ``linear``       – one Linear(Dv → D);
  * ``mlp{N}x_gelu`` – Linear(Dv → D), then (GELU, Linear(D → D)) × (N − 1)  (LLaVA-1.5 uses N = 2);
  * ``identity``     – no parameters; only valid when Dv == D.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from factory.errors import FactoryError
from factory.registry import CONNECTORS

MAX_MLP_DEPTH = 4


@CONNECTORS.register("linear")
def build_linear(cfg: Any, in_dim: int, out_dim: int) -> nn.Module:
    return nn.Linear(in_dim, out_dim)


def build_mlp(depth: int, in_dim: int, out_dim: int) -> nn.Sequential:
    layers = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


def _register_mlp(depth: int) -> None:
    @CONNECTORS.register(f"mlp{depth}x_gelu")
    def build(cfg: Any, in_dim: int, out_dim: int) -> nn.Module:
        return build_mlp(depth, in_dim, out_dim)

    build.__name__ = f"build_mlp{depth}x_gelu"


for _depth in range(1, MAX_MLP_DEPTH + 1):
    _register_mlp(_depth)


@CONNECTORS.register("identity")
def build_identity(cfg: Any, in_dim: int, out_dim: int) -> nn.Module:
    if in_dim != out_dim:
        raise FactoryError(
            f"The identity connector needs the vision width to equal the LLM width, but the vision encoder gives "
            f"{in_dim} and the LLM expects {out_dim}. Use `connector=linear` or `connector=mlp2x_gelu` instead."
        )
    return nn.Identity()
