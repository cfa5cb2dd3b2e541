"""Checkpoints in and out of the factory: other projects' folders imported as a LlavaModel (registered in
registry.CHECKPOINT_IMPORTERS by scheme, e.g. `hf:`), and exports to their layouts (docs/interop.md).

Importing this package imports every module in it, so that each importer registers itself."""
from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
