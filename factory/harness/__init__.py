"""External evaluation harnesses run on a factory checkpoint: `python eval.py checkpoint=<run>/<stage> harness=<name>`.

Each module of this package registers its harness in `factory.registry.HARNESSES` under the `name` of its
configs/harness/*.yaml (lm_eval: text-only retention through lm-evaluation-harness; lmms_eval: the factory model
inside lmms-eval). Every module is imported here (pkgutil), so a harness registers just by living in a file of the
package; the harness packages themselves (lm_eval, lmms_eval) are imported only when a harness runs.

A harness entry is a callable `run(cfg) -> dict` taking eval.py's composed config (the `harness` node holds its
options) and returning a summary; it writes its results into the eval output folder.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import List

HARNESS_MODULES: List[str] = [f"{__name__}.{info.name}" for info in pkgutil.iter_modules(__path__)]
for _module in HARNESS_MODULES:
    importlib.import_module(_module)
