"""Optimizer and learning-rate schedule of a stage: torch AdamW (a client optimizer for DeepSpeed) + cosine decay
with linear warmup. DeepSpeed's own Adam variants JIT-compile C++/CUDA ops on first use, which costs a minute per
fresh machine; torch's AdamW is as fast for the small trainable sets of stage 1/2 and works on CPU and GPU."""
from __future__ import annotations

import math
from typing import Iterable

import torch


def build_optimizer(parameters: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                    betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    params = [p for p in parameters if p.requires_grad]
    # No decay on biases and norm weights (1-D tensors), the usual AdamW practice (and what LLaVA's trainer does).
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    # foreach=False keeps the update order identical however parameters are grouped across ranks
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, foreach=False)


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
