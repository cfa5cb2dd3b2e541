"""The tuner files written beside an exported HF Llava folder, for the tuners that cannot be merged into weights
(MoReS, the bottleneck adapter): `factory.hf.attach(hf_model, folder)` hooks them into a loaded
`LlavaForConditionalGeneration` (docs/interop.md).

    <out>/factory_tuner.json          settings: tuner name, its options, the steered layers, the positions rule …
    <out>/factory_tuner.safetensors   weights, named relative to the LLM's list of decoder layers

Weight names (the decoder layer numbering is the same in the factory's LLM and in HF Llava's language model):
  MoReS     `mores.interventions.<layer>.…` — the MoReS module's own state (R as householder reflectors, so the HF
            model computes bit for bit what the factory computes) — plus `rotation.<layer>` (the materialised R,
            D×d fp32), `weight.<layer>` (W, d×D) and `bias.<layer>` (b) for readers without the factory;
  adapter   `<layer>.<mlp>.<projection>.adapter.{down,up}.weight`; `sites` in the settings says which side of each
            projection the adapter sits on (input of fc1 / gate_proj / up_proj, output of fc2 / down_proj).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

import torch
from safetensors.torch import load_file, save_file

from factory.errors import FactoryError
from factory.model.llms import decoder_layers
from factory.tuners import BottleneckAdapter, MoReS, build_tuner, llm_arch

SETTINGS_FILE, WEIGHTS_FILE = "factory_tuner.json", "factory_tuner.safetensors"
FORMAT, VERSION = "factory-tuner", 1
ATTACHABLE = ("mores", "adapter")


def _tuner_config(model: Any, checkpoint_meta: Mapping[str, Any]) -> Dict[str, Any]:
    """The `tuner` config node the model was tuned with (its config), checked against the checkpoint's meta."""
    config = getattr(model, "config", None) or {}
    tuner_cfg = dict(config.get("tuner") or {})
    name = checkpoint_meta.get("tuner") or getattr(model, "applied_tuner", None) or tuner_cfg.get("name")
    if name not in ATTACHABLE:
        raise FactoryError(
            f"Tuner files are written for the tuners that cannot be merged into the LLM weights "
            f"({', '.join(ATTACHABLE)}); this checkpoint's tuner is {name!r}. Export it directly (full, frozen) or merged (lora, ia3, oft)."
        )
    if tuner_cfg.get("name") not in (None, name):
        raise FactoryError(f"The checkpoint's meta.json names tuner {name!r} but its config.yaml names "
                           f"{tuner_cfg.get('name')!r}; the checkpoint folder is inconsistent.")
    tuner_cfg["name"] = name
    tuner_cfg.pop("vision_lora", None)
    return tuner_cfg


def _mores_files(model: Any) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    mores = getattr(model.llm, "mores", None)
    if not isinstance(mores, MoReS):
        raise FactoryError("The model's tuner is MoReS but its LLM carries no MoReS module; load the checkpoint with "
                           "factory.load_checkpoint (it re-attaches the tuner) before writing the tuner files.")
    weights = {f"mores.{k}": v for k, v in mores.state_dict().items()}
    for key, intervention in mores.interventions.items():
        weights[f"rotation.{key}"] = intervention.rotation().detach()
        weights[f"weight.{key}"] = intervention.project.weight.detach()
        weights[f"bias.{key}"] = intervention.project.bias.detach()
    settings = {"layers": list(mores.layer_ids),  # resolved; the options hold rank, positions and their rule
                "formula": "h' = h + R (W h + b - R^T h) at the selected positions of each listed layer's output, "
                           "prefill only"}
    return settings, weights


def _adapter_files(model: Any) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    arch = llm_arch(model.llm, "adapter")
    layers = decoder_layers(model.llm)
    weights: Dict[str, torch.Tensor] = {}
    sites: List[Dict[str, str]] = []
    for name, module in layers.named_modules():
        if not isinstance(module, BottleneckAdapter):
            continue
        path = name[: -len(".adapter")]
        projection = path.rsplit(".", 1)[-1]
        sites.append({"path": path, "side": "input" if projection in arch.mlp_in else "output"})
        weights.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    if not sites:
        raise FactoryError("The model's tuner is the adapter but its LLM carries no adapter; load the checkpoint with "
                           "factory.load_checkpoint before writing the tuner files.")
    settings = {"sites": sites,
                "formula": "x + up(act(down(x))) on the input (D-wide side) of the MLP's input projections and on "
                           "the output of its output projection"}
    return settings, weights


def write_tuner_files(model: Any, checkpoint_meta: Mapping[str, Any], out_dir: Any) -> List[Path]:
    """Write the tuner's settings and weights into `out_dir` (an exported HF Llava folder). Existing tuner files
    are never overwritten. Returns the two paths written."""
    out_dir = Path(str(out_dir))
    if not out_dir.is_dir():
        raise FactoryError(f"{out_dir} does not exist; write the HF base model there first (python -m factory.export).")
    tuner_cfg = _tuner_config(model, checkpoint_meta)
    targets = [out_dir / SETTINGS_FILE, out_dir / WEIGHTS_FILE]
    existing = [str(p) for p in targets if p.exists()]
    if existing:
        raise FactoryError(f"{', '.join(existing)} already exist(s); tuner files are never overwritten. Export into "
                           "a new folder.")
    options = dataclasses.asdict(build_tuner(tuner_cfg).options)
    specific, weights = (_mores_files if tuner_cfg["name"] == "mores" else _adapter_files)(model)
    llm_config = model.llm.config
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in weights.values()})
    settings = {
        "format": FORMAT, "version": VERSION, "tuner": tuner_cfg["name"], "options": options,
        "num_layers": len(decoder_layers(model.llm)), "hidden_size": int(llm_config.hidden_size),
        "llm_model_type": getattr(llm_config, "model_type", None), "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "image_token_count": int(getattr(model, "image_token_count", 0)), **specific,
    }
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in weights.items()}, str(targets[1]),
              metadata={"format": "pt"})
    targets[0].write_text(json.dumps(settings, indent=2) + "\n")
    return targets


def has_tuner_files(folder: Any) -> bool:
    return (Path(str(folder)) / SETTINGS_FILE).is_file()


def read_tuner_files(folder: Any) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(settings, weights) of the tuner files in `folder`; a FactoryError naming the file when they are missing,
    unreadable or of another format."""
    folder = Path(str(folder))
    settings_path, weights_path = folder / SETTINGS_FILE, folder / WEIGHTS_FILE
    missing = [p.name for p in (settings_path, weights_path) if not p.is_file()]
    if missing:
        raise FactoryError(
            f"{folder} has no tuner files ({', '.join(missing)} missing). They are written by `python -m "
            f"factory.export` for a MoReS or adapter checkpoint; a folder exported from another tuner needs none."
        )
    try:
        settings = json.loads(settings_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FactoryError(f"{settings_path} is not valid JSON ({err}); re-export the checkpoint.") from None
    if not isinstance(settings, dict) or settings.get("format") != FORMAT or settings.get("tuner") not in ATTACHABLE:
        raise FactoryError(f"{settings_path} is not a factory tuner settings file (format {FORMAT!r}, tuner one of "
                           f"{', '.join(ATTACHABLE)}); re-export the checkpoint.")
    if int(settings.get("version", 0)) > VERSION:
        raise FactoryError(f"{settings_path} has version {settings.get('version')}, newer than this factory reads "
                           f"({VERSION}); update the factory.")
    try:
        weights = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for truncated / garbled headers
        raise FactoryError(f"{weights_path} cannot be read ({type(err).__name__}: {err}); the file is corrupt or "
                           "truncated. Re-export the checkpoint.") from None
    return settings, weights


def prefixed(weights: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The entries of `weights` under `prefix.`, with the prefix removed."""
    return {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")}


__all__ = ["ATTACHABLE", "SETTINGS_FILE", "WEIGHTS_FILE", "has_tuner_files", "prefixed", "read_tuner_files",
           "write_tuner_files"]
