"""Optimizer and learning-rate schedule of a stage. The optimizer is a config component, chosen by name in
configs/trainer/*.yaml (`optimizer: {name: adamw, betas: [0.9, 0.999], eps: 1.0e-8}`; OPTIMIZERS registry); the
learning rate and weight decay are per stage (`trainer.<stage>.lr`, `.weight_decay`).

`adamw` is torch's AdamW as a client optimizer for DeepSpeed: DeepSpeed's own Adam variants JIT-compile C++/CUDA ops
on first use, which costs a minute per fresh machine; torch's AdamW is as fast for the small trainable sets of stage
1/2 and works on CPU and GPU. The schedule is cosine decay with linear warmup."""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from factory.errors import FactoryError
from factory.registry import OPTIMIZERS


def decay_groups(params: List[torch.nn.Parameter], weight_decay: float) -> List[dict]:
    """No decay on biases and norm weights (1-D tensors), the usual AdamW practice (and what LLaVA's trainer does)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


@OPTIMIZERS.register("adamw")
def adamw(params: List[torch.nn.Parameter], lr: float, weight_decay: float, betas: Sequence[float] = (0.9, 0.999),
          eps: float = 1e-8) -> torch.optim.AdamW:
    # foreach=False keeps the update order identical however parameters are grouped across ranks
    return torch.optim.AdamW(decay_groups(params, weight_decay), lr=lr, betas=tuple(float(b) for b in betas),
                             eps=float(eps), foreach=False)


def optimizer_choice(optimizer_cfg: Optional[Any]) -> Tuple[Callable, Dict[str, Any]]:
    """(builder, options) of `trainer.optimizer` (adamw when the trainer config names none); an unknown name or
    option is a FactoryError naming the key. The recipe calls it before the run folder is touched."""
    node = dict(optimizer_cfg or {})
    name = str(node.pop("name", "adamw"))
    make = OPTIMIZERS.get(name)
    accepted = [p for p in inspect.signature(make).parameters if p not in ("params", "lr", "weight_decay")]
    unknown = sorted(set(node) - set(accepted))
    if unknown:
        raise FactoryError(f"`trainer.optimizer.{unknown[0]}` is not an option of optimizer {name!r}; it takes "
                           f"{', '.join(accepted) or 'no options'} (lr and weight_decay are set per stage).")
    return make, node


def build_optimizer(parameters: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                    optimizer_cfg: Optional[Any] = None) -> torch.optim.Optimizer:
    """The configured optimizer over the parameters that require grad."""
    make, options = optimizer_choice(optimizer_cfg)
    return make([p for p in parameters if p.requires_grad], lr=lr, weight_decay=weight_decay, **options)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """LR multiplier: linear 0→1 over ceil(ratio·total) steps, then cosine 1→0 at `total_steps`
    (the shape of the cosine schedule in LLaVA's scripts, except that the first step already has a non-zero LR)."""
    warmup = warmup_steps(total_steps, warmup_ratio)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1) if warmup else 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
