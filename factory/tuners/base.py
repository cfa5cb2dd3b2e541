"""The tuner protocol and its registration.

A tuner changes only the LLM (`model.llm`): it attaches its own modules (MoReS interventions, PEFT layers, adapters)
and marks exactly its own parameters trainable. Freezing everything else and counting parameters is done once, in
`factory.tuners.apply_tuning`. A tuner is a `Tuner` subclass with

* `name`: the one place its registry name is written (`tuner.name` in YAML, configs/tuner/<name>.yaml);
* `Options`: a frozen dataclass of its config keys with their types and defaults (factory.tuners.options);
* `@register_tuner` on the class: adds it to the TUNERS registry under `name`.

Any module of the factory.tuners package is imported when the registry is first used, so a new file with a
registered tuner needs no import list edited (docs/tuners.md, "Adding a tuner").
"""
from __future__ import annotations

from typing import Any, Mapping, Type

from torch import nn

from factory.errors import FactoryError
from factory.registry import TUNERS
from factory.tuners.options import NoOptions, parse_options


class Tuner:
    """Base class of the TUNERS registry entries (see the module docstring)."""

    name = ""
    Options: type = NoOptions

    def __init__(self, cfg: Mapping[str, Any]):
        self.options = parse_options(self.Options, cfg, self.name)

    def is_attached(self, model: nn.Module) -> bool:
        """True when this tuner's modules are already in model.llm (apply_tuning is idempotent)."""
        return False

    def attach(self, model: nn.Module) -> None:
        """Add the tuner's modules to model.llm (may replace model.llm, e.g. by a PEFT wrapper)."""

    def mark_trainable(self, model: nn.Module) -> None:
        """Set requires_grad on the tuner's own parameters (everything is frozen before this is called)."""

    def merge_for_export(self, model: nn.Module) -> None:
        raise FactoryError(
            f"The {self.name!r} tuner cannot be merged into the LLM weights; export the trainable weights "
            f"(trainable.safetensors) together with the tuner config instead."
        )


def register_tuner(cls: Type[Tuner]) -> Type[Tuner]:
    """Class decorator: register `cls` in TUNERS under its `name` attribute (written nowhere else)."""
    name = cls.__dict__.get("name")
    if not name or not isinstance(name, str):
        raise TypeError(f"{cls.__qualname__} needs a class attribute `name` (its registry name) to be registered")
    TUNERS.register(name)(cls)
    return cls
