"""Helpers every component builder shares (vision encoders, LLMs, build_model, checkpoint loading): reading optional
config keys, the shipped architecture files for init=random|meta, `from_pretrained` with a readable error, dtypes.
They live here, below the builders, so that no component imports the module that composes them (build.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple

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


def from_pretrained_or_explain(model_class: Any, path: Any, key: str, what: str,
                               unused_prefixes: Tuple[str, ...] = (), **kwargs: Any) -> Any:
    """`model_class.from_pretrained(path, **kwargs)`, strict: a missing/unreadable model, and weights that do not
    cover the module (missing, unexpected or mis-shaped tensors), are a FactoryError that names the config key, the
    folder and the first offending keys, instead of a stack trace from the hub client or, worse, a module left with
    random weights. `unused_prefixes`: tensors the folder may legitimately hold beyond the module (the text tower of
    a whole CLIP/SigLIP checkpoint when only its vision tower is loaded); the caller lists them explicitly."""
    try:
        model, info = model_class.from_pretrained(str(path), output_loading_info=True, **kwargs)
    except (OSError, ValueError) as err:
        raise FactoryError(
            f"Could not load the {what} from `{key}` = {path!r}: {err}. Check the hub id or the local folder (it "
            "needs config.json and the weights); offline, download it first."
        ) from None
    check_loading_info(info, path, key, what, unused_prefixes)
    return model


def check_loading_info(info: Dict[str, Any], path: Any, key: str, what: str,
                       unused_prefixes: Tuple[str, ...] = ()) -> None:
    """Refuse a `from_pretrained` whose weights did not cover the module (transformers only warns, and initialises
    the uncovered parameters at random). `info` is the `output_loading_info` dict."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(k for k in (info.get("unexpected_keys") or ()) if not k.startswith(unused_prefixes))
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in (info.get("mismatched_keys") or ()))
    if not (missing or unexpected or mismatched):
        return
    parts = [f"{label} {len(keys)} ({short_list(keys)})" for label, keys in
             (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)) if keys]
    raise FactoryError(
        f"The weights in `{key}` = {path!r} do not fit the {what}: {'; '.join(parts)}. The folder holds another "
        f"model (or another layout: a whole LLaVA checkpoint is imported with stage.init_from=hf:<folder>, not given "
        f"as a component path), so the {what} would run with random weights. Point `{key}` at a folder of this "
        "component alone."
    )


def short_list(names: Any, limit: int = 4) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


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
