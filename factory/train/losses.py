"""Training losses, chosen by name in configs/trainer/*.yaml (`loss: {name: label_token_ce}`; LOSSES registry).

A loss gives the recipe two numbers per micro-batch: `count(batch)`, how many targets it sums over, and
`sum(logits, labels)`, the summed loss over those targets. The recipe divides the sum by the count of the whole
global batch (every micro-batch on every rank), so 2 micro-batches of 4 equal 1 of 8 and 2 processes equal 1
(factory/train/loop.py).
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from factory.constants import IGNORE_INDEX
from factory.errors import FactoryError
from factory.model.llava import token_loss_sum
from factory.registry import LOSSES


@LOSSES.register("label_token_ce")
class LabelTokenCrossEntropy:
    """Next-token cross-entropy over the label tokens (labels other than IGNORE_INDEX), computed in fp32: LLaVA's
    objective, with the mean taken over the global batch's label tokens instead of per micro-batch."""

    def count(self, batch: Dict[str, Any]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_loss_sum(logits, labels)


def build_loss(trainer_cfg: Any):
    """The loss named by `trainer.loss.name` (label_token_ce when the trainer config names none)."""
    node = (trainer_cfg.get("loss") if trainer_cfg is not None else None) or {}
    options = {k: v for k, v in dict(node).items() if k != "name"}
    if options:
        raise FactoryError(f"`trainer.loss` has options {sorted(options)}, which loss "
                           f"{node.get('name', 'label_token_ce')!r} does not take; remove them.")
    return LOSSES.get(str(node.get("name", "label_token_ce")))()
