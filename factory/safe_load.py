"""No code runs from data: loading files that may come from someone else (a shared run folder, a downloaded
checkpoint) without letting them execute code.

* Tensor files are read with ``torch.load(weights_only=True)``: torch's restricted unpickler builds tensors, numbers,
  strings and containers only. The few plain classes DeepSpeed puts in its resume state (an enum, a named tuple, the
  loss-scaler record) are allowed by name for that one load (``torch.serialization.safe_globals``), never globally.
  Anything else (a crafted ``__reduce__`` calling ``os.system``, …) is refused with a FactoryError naming the file.
* ``trust_remote_code`` (Python files shipped with a hub model) is honoured from a checkpoint's config.yaml only when
  the user asked for it on the command line; a checkpoint cannot switch it on by itself.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any, Iterable, List, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from factory.errors import FactoryError


def deepspeed_state_globals() -> List[Any]:
    """The classes DeepSpeed's own (ZeRO-1/2/3, fp32/bf16/fp16) resume files contain besides tensors and builtins.
    Each is plain data: rebuilding one runs no code of the file's choosing."""
    # deepspeed is heavy (seconds to import): only reading a resume state needs its record classes
    from deepspeed.runtime.fp16 import loss_scaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # the fp16 scaler's settings records exist only in newer DeepSpeed releases
    scalers = [getattr(loss_scaler, name, None) for name in
               ("LossScaler", "DynamicLossScaler", "LossScaleConfig", "LossScaleProfile")]
    return [ZeroStageEnum, fragment_address, *[cls for cls in scalers if cls is not None]]


def load_torch_file(path: Path, allowed_globals: Sequence[Any] = (), map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with `allowed_globals` accepted for this call only; a file that needs
    anything else (i.e. could run code) → FactoryError naming the file and what it asked for."""
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        wanted = _unsafe_globals(path, str(err))
        raise FactoryError(
            f"Refused to load {path}: it is not a plain tensor file{wanted} and loading it could run code, so it was "
            "not loaded. The factory writes these files only with tensors and a few known DeepSpeed records; this "
            "one was changed or placed there by something else. Delete the file (or the checkpoint folder) and "
            "resume from another checkpoint, or start a new run_dir."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise FactoryError(f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]}); the "
                           "file is corrupt or truncated. Resume from another checkpoint or start a new run_dir.") from None


def _unsafe_globals(path: Path, message: str) -> str:
    """' (it asks for posix.system)': what the file wanted to import, from the checkpoint or torch's message."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip checkpoint (a raw pickle): the unpickler's own message names the global
        names = re.findall(r"GLOBAL ([\w.]+)", message)
    return f" (it asks for {', '.join(names[:5])})" if names else ""


# ------------------------------------------------------------------------------------------------ trust_remote_code
def remote_code_requests(cfg: Any) -> List[str]:
    """`key=value` for each `trust_remote_code` of a config that is not false (any component may carry one; a
    string such as "false" counts as a request too: only a real false is off)."""
    tree = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    found: List[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                dotted = f"{prefix}{key}"
                if key == "trust_remote_code" and value not in (False, None):
                    found.append(f"{dotted}={json.dumps(value)}")
                else:
                    walk(value, dotted + ".")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{prefix}{i}.")

    walk(tree, "")
    return found


def check_remote_code(cfg: Any, source: Path, allowed: bool, option: str = "trust_remote_code=true") -> None:
    """A config read from `source` (a checkpoint's config.yaml) may ask for remote code only if the user allowed it."""
    requests = remote_code_requests(cfg)
    if requests and not allowed:
        paths = _model_paths(cfg)
        raise FactoryError(
            f"{source} sets {', '.join(requests)}: loading it would download and run Python code "
            f"shipped with the model{(' ' + paths) if paths else ''}, and a checkpoint cannot switch that on by itself. "
            f"If you trust that code, pass {option} on the command line (load_checkpoint(..., trust_remote_code=True) "
            "from Python); otherwise use a checkpoint whose models need no remote code."
        )


def _model_paths(cfg: Any) -> str:
    names: Iterable[str] = []
    try:
        names = [str(cfg[c]["path"]) for c in ("llm", "vision") if cfg.get(c) and cfg[c].get("path")]
    except (AttributeError, KeyError, TypeError):
        pass
    return "(" + ", ".join(names) + ")" if names else ""
