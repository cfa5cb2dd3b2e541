"""One Registry class; components are selected by their registered name from YAML (never by path substrings)."""
from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, List

from factory.errors import FactoryError


class Registry:
    """Maps explicit names (as written in YAML) to builders/classes.

    >>> CONNECTORS = Registry("connector")
    >>> @CONNECTORS.register("linear")
    ... def build_linear(...): ...
    >>> CONNECTORS.get("linear")
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def decorator(obj: Any) -> Any:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> Any:
        _import_components()
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
        _import_components()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        _import_components()
        return name in self._items


VISION_ENCODERS = Registry("vision encoder")
CONNECTORS = Registry("connector")
LLMS = Registry("llm")
TEMPLATES = Registry("chat template")
TUNERS = Registry("tuner")
BENCHMARKS = Registry("benchmark")

# Modules whose import registers components. Imported lazily on first lookup so that `import factory` stays cheap.
_COMPONENT_MODULES = (
    "factory.model.vision",
    "factory.model.connectors",
    "factory.model.llms",
    "factory.data.templates",
    "factory.tuners",
    "factory.eval.benchmarks",
)
_imported = False


def _import_components() -> None:
    global _imported
    if _imported:
        return
    _imported = True
    import importlib

    for module in _COMPONENT_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:  # a component family not present yet must not break the others
            if err.name != module:
                raise
