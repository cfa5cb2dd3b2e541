"""The two tuners that act on the LLM as a whole: `frozen` (nothing trains) and `full` (everything trains)."""
from __future__ import annotations

from torch import nn

from factory.tuners.base import Tuner, register_tuner


@register_tuner
class FrozenTuner(Tuner):
    """`tuner=frozen`: the LLM is not trained (only the connector, as in stage 1)."""

    name = "frozen"


@register_tuner
class FullTuner(Tuner):
    """`tuner=full`: full fine-tuning of every LLM parameter."""

    name = "full"

    def mark_trainable(self, model: nn.Module) -> None:
        model.llm.requires_grad_(True)
