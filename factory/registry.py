"""One Registry class; components are selected by their registered name from YAML (never by path substrings)."""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Dict, List, Tuple

from factory.errors import FactoryError


class Registry:
    """Maps explicit names (as written in YAML) to builders/classes.

    >>> CONNECTORS = Registry("connector")
    >>> @CONNECTORS.register("linear")
    ... def build_linear(...): ...
    >>> CONNECTORS.get("linear")
    """

    def __init__(self, kind: str, modules: Tuple[str, ...] = ()):
        self.kind = kind
        # Modules whose import registers this family's components; imported on first lookup, so that a lookup of a
        # chat template never pays for importing open_clip or timm.
        self._modules = modules
        self._imported = False
        self._items: Dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def decorator(obj: Any) -> Any:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> Any:
        self._import_components()
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "(none)"
            close = difflib.get_close_matches(str(name), list(self._items), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise FactoryError(
                f"Unknown {self.kind} {name!r}.{hint} Registered {self.kind}s: {known}. "
                f"Set the `name` key of the {self.kind} config (or pick another config file) to one of these."
            )
        return self._items[name]

    def names(self) -> List[str]:
        self._import_components()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._import_components()
        return name in self._items

    def _import_components(self) -> None:
        if self._imported:
            return
        self._imported = True
        for module in self._modules:
            importlib.import_module(module)


VISION_ENCODERS = Registry("vision encoder", ("factory.model.vision",))
CONNECTORS = Registry("connector", ("factory.model.connectors",))
LLMS = Registry("llm", ("factory.model.llms",))
TEMPLATES = Registry("chat template", ("factory.data.templates",))
TUNERS = Registry("tuner", ("factory.tuners",))
BENCHMARKS = Registry("benchmark", ("factory.eval.benchmarks",))
# Data sets generated on first use (the micro-world), keyed by the data config's `name`: train runs the entry, if any.
DATA_PREPARERS = Registry("data preparer", ("factory.data.prepare",))
# Evaluations run on the final model of a training run, keyed by the `name` of configs/eval/*.yaml. The training
# recipe looks them up by name only, so train/ never imports eval/ (docs/architecture.md).
# Training components chosen in configs/trainer/*.yaml: `optimizer: {name: adamw}`, `loss: {name: label_token_ce}`.
OPTIMIZERS = Registry("optimizer", ("factory.train.optim",))
LOSSES = Registry("loss", ("factory.train.losses",))
AFTER_TRAINING = Registry("after-training evaluation", ("factory.eval.after_training",))
# External evaluation harnesses run by `eval.py harness=<name>` (lm_eval, lmms_eval), keyed by the `name` of
# configs/harness/*.yaml; factory/harness/__init__.py imports every module of its package.
HARNESSES = Registry("harness", ("factory.harness",))
# Where a stage starts from, keyed by the scheme of `stage.init_from` (`hf:<dir>`, `tinyllava:<dir>`): each entry
# builds a LlavaModel from a folder another project saved (docs/interop.md).
CHECKPOINT_IMPORTERS = Registry("checkpoint importer", ("factory.interop",))
