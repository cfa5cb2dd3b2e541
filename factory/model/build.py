"""build_model(cfg): compose vision encoder → connector → LLM from a resolved config.

`cfg.init` decides where the weights come from:
  * ``pretrained`` – each component's ``path`` (HF hub id or local folder / checkpoint file);
  * ``random``     – the architecture file named by ``arch`` (factory/model/arch/<arch>.json), freshly initialised;
  * ``meta``       – the same architecture under ``torch.device("meta")``: no memory, no network, built in
                     seconds; used for parameter counting and for dry runs of the largest presets.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from factory.errors import FactoryError
from factory.registry import CONNECTORS, LLMS, VISION_ENCODERS

ARCH_DIR = Path(__file__).resolve().parent / "arch"
INIT_MODES = ("pretrained", "random", "meta")


def node_get(node: Any, key: str, default: Any = None) -> Any:
    """Read an optional key from a DictConfig or a plain dict (missing or null → default)."""
    if node is None:
        return default
    value = node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)
    return default if value is None else value


def check_init(init: str) -> str:
    if init not in INIT_MODES:
        raise FactoryError(
            f"Unknown init mode {init!r} (config key `init`). Use one of: {', '.join(INIT_MODES)} — "
            "pretrained loads each component's `path`, random/meta build from the shipped `arch` file."
        )
    return init


def from_pretrained_or_explain(model_class: Any, path: Any, key: str, what: str, **kwargs: Any) -> Any:
    """`model_class.from_pretrained(path, **kwargs)`, with a missing/unreadable model reported as a FactoryError that
    names the config key instead of a stack trace from the hub client."""
    try:
        return model_class.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as err:
        raise FactoryError(
            f"Could not load the {what} from `{key}` = {path!r}: {err}. Check the hub id or the local folder (it "
            "needs config.json and the weights); offline, download it first."
        ) from None


def load_arch(node: Any, component: str) -> Dict[str, Any]:
    """The architecture dict for init=random|meta: `arch` is a name in factory/model/arch/ or a path to a JSON file.

    `arch_overrides` (optional mapping in the same config node) replaces single fields, e.g. a 2-layer variant.
    """
    arch = node_get(node, "arch")
    if not arch:
        raise FactoryError(
            f"The {component} config has no `arch`, which init=random|meta needs to build the model offline. "
            f"Set `{component}.arch` to one of: {', '.join(available_archs())} (or a path to a config.json), "
            "or use init=pretrained."
        )
    path = Path(str(arch)).expanduser()
    if not (path.suffix == ".json" and path.is_file()):
        path = ARCH_DIR / f"{arch}.json"
    if not path.is_file():
        raise FactoryError(
            f"Architecture {arch!r} (config key `{component}.arch`) was not found: neither a JSON file nor a name "
            f"in {ARCH_DIR}. Available names: {', '.join(available_archs())}."
        )
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FactoryError(f"Architecture file {path} is not valid JSON ({err}). Fix or replace the file.") from None
    overrides = node_get(node, "arch_overrides", {})
    if isinstance(overrides, DictConfig):
        overrides = OmegaConf.to_container(overrides, resolve=True)
    values.update(dict(overrides))
    return values


def available_archs():
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


def resolve_dtype(dtype: Any) -> torch.dtype:
    """None → float32 (CPU default); accepts torch dtypes and the usual strings (bf16, fp16, fp32...)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if str(dtype) not in names:
        raise FactoryError(f"Unknown dtype {dtype!r}. Use one of: {', '.join(names)}.")
    return names[str(dtype)]


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
    from factory.model.llava import LlavaModel

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

