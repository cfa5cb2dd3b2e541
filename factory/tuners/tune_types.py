"""Tune types per component and the stage presets.

apply_tuning freezes the whole model first, then each component is made trainable by its tune type:
  vision:    frozen | full | lora   (lora: factory.tuners.vision_lora)
  connector: frozen | full
  llm:       frozen | full | tuner  (tuner = the configured tuner, e.g. mores, lora, adapter)
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Dict, Mapping

from omegaconf import OmegaConf

from factory.config import CONFIG_DIR
from factory.errors import FactoryError

TUNE_TYPES = {
    "vision": ("frozen", "full", "lora"),
    "connector": ("frozen", "full"),
    "llm": ("frozen", "full", "tuner"),
}

STAGES = ("pretrain", "instruct")


@lru_cache(maxsize=1)
def _stage_tune() -> Dict[str, Dict[str, str]]:
    # Read from the stage YAML itself (configs/stage/all.yaml: stage 1 trains the connector only, stage 2 adds the
    # tuner), so the defaults of apply_tuning can never drift from what train.py runs.
    stage = OmegaConf.load(CONFIG_DIR / "stage" / "all.yaml")
    return {name: check_tune(stage[name].tune, where=f"configs/stage/all.yaml: {name}.tune") for name in STAGES}


def stage_tune(stage: str) -> Dict[str, str]:
    """The `tune` preset of `stage` (pretrain | instruct) as configs/stage/all.yaml writes it."""
    return dict(_stage_tune()[stage])


def check_tune(tune: Mapping[str, Any], where: str = "stage.<stage>.tune") -> Dict[str, str]:
    """Validate a `tune` mapping ({vision, connector, llm}) and return it as a plain dict; `where` names the key in
    error messages."""
    tune = dict(tune or {})
    unknown = sorted(set(tune) - set(TUNE_TYPES))
    missing = sorted(set(TUNE_TYPES) - set(tune))
    if unknown or missing:
        raise FactoryError(
            f"{where} must name exactly the components vision, connector and llm "
            f"(missing: {missing or 'none'}; unknown: {unknown or 'none'}). Example: "
            f"{{vision: frozen, connector: full, llm: tuner}}."
        )
    for component, value in tune.items():
        if value not in TUNE_TYPES[component]:
            raise FactoryError(
                f"{where}.{component}={value!r} is not a tune type for the {component}; use one of "
                f"{', '.join(TUNE_TYPES[component])}."
            )
    return {k: str(v) for k, v in tune.items()}
