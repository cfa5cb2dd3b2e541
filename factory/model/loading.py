"""Helpers every component builder shares (vision encoders, LLMs, build_model, checkpoint loading): reading optional
config keys, the shipped architecture files for init=random|meta, `from_pretrained` with a readable error, dtypes.
They live here, below the builders, so that no component imports the module that composes them (build.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch
from omegaconf import DictConfig, OmegaConf

from factory.errors import FactoryError

ARCH_DIR = Path(__file__).resolve().parent / "arch"


def node_get(node: Any, key: str, default: Any = None) -> Any:
    """Read an optional key from a DictConfig or a plain dict (missing or null → default)."""
    if node is None:
        return default
    value = node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)
    return default if value is None else value


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


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every floating-point parameter to `dtype`, buffers untouched (rotary inv_freq stays fp32): the cast
    `deepspeed.initialize` applies to the module in bf16 mode, so that a checkpoint reloaded in that dtype runs the
    exact model that trained. Without it, adapters that PEFT or a tuner keep in fp32 would compute in fp32 after a
    reload while training computed them in bf16."""
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (cpu for a module without parameters)."""
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")
