"""build_model(cfg): compose vision encoder → connector → LLM from a resolved config.

`cfg.init` decides where the weights come from:
  * ``pretrained`` – each component's ``path`` (HF hub id or local folder / checkpoint file);
  * ``random``     – the architecture file named by ``arch`` (factory/model/arch/<arch>.json), freshly initialised;
  * ``meta``       – the same architecture under ``torch.device("meta")``: no memory, no network, built in
                     seconds; used for parameter counting and for dry runs of the largest presets.
"""
from __future__ import annotations

import contextlib
from typing import Any, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from factory.errors import FactoryError
from factory.model.llava import LlavaModel
from factory.model.loading import node_get, resolve_dtype
from factory.registry import CONNECTORS, LLMS, VISION_ENCODERS

INIT_MODES = ("pretrained", "random", "meta")


def check_init(init: str) -> str:
    if init not in INIT_MODES:
        raise FactoryError(
            f"Unknown init mode {init!r} (config key `init`). Use one of: {', '.join(INIT_MODES)} — "
            "pretrained loads each component's `path`, random/meta build from the shipped `arch` file."
        )
    return init


def _section(cfg: Any, key: str) -> Any:
    node = cfg.get(key) if hasattr(cfg, "get") else None
    if node is None:
        raise FactoryError(
            f"The config has no `{key}` section, which build_model needs. Compose it with Hydra "
            f"(e.g. `model=llava_3b` or `{key}=...`) or add a `{key}:` mapping with at least a `name` key."
        )
    if node_get(node, "name") is None:
        raise FactoryError(f"The `{key}` config has no `name` key; set it to a registered {key} name.")
    return node


def build_model(cfg: Any, dtype: Optional[Any] = None):
    """Build a LlavaModel from `cfg.vision`, `cfg.connector`, `cfg.llm` and `cfg.init`."""
    if isinstance(cfg, Mapping) and not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    init = check_init(str(node_get(cfg, "init", "pretrained")))
    dtype = resolve_dtype(dtype)
    vision_cfg, connector_cfg, llm_cfg = _section(cfg, "vision"), _section(cfg, "connector"), _section(cfg, "llm")

    vision = VISION_ENCODERS.get(vision_cfg.name)(vision_cfg, init=init, dtype=dtype)
    llm, tokenizer = LLMS.get(llm_cfg.name)(llm_cfg, init, dtype)
    llm_dim = llm.get_input_embeddings().embedding_dim
    # The connector is always trained from scratch in stage 1, so it is random for every init mode.
    with torch.device("meta") if init == "meta" else contextlib.nullcontext():
        connector = CONNECTORS.get(connector_cfg.name)(connector_cfg, vision.hidden_size, llm_dim)
    connector = connector.to(dtype)

    template = node_get(llm_cfg, "template")
    config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    return LlavaModel(vision=vision, connector=connector, llm=llm, tokenizer=tokenizer, template=template,
                      config=config)

