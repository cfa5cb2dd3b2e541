"""Data sets that are generated on first use, registered by the `name` of their data config (DATA_PREPARERS).

`prepare_data(cfg.data)` runs the preparer registered under `data.name`, if any; a data set without one (LLaVA-1.5,
your own JSON) is read as it is. The training recipe calls it on rank 0 first, then on the others (which then find
the generated files cached)."""
from __future__ import annotations

from typing import Any

from factory.data.microworld import ensure_microworld
from factory.registry import DATA_PREPARERS

DATA_PREPARERS.register("microworld")(ensure_microworld)


def prepare_data(data_cfg: Any) -> None:
    name = data_cfg.get("name") if data_cfg is not None else None
    if name is not None and name in DATA_PREPARERS:
        DATA_PREPARERS.get(name)(data_cfg)
