"""TinyLLaVA Factory's per-component checkpoint (also what LLaVA-Steering saves) → the factory's LlavaModel: the
importer registered as `tinyllava` (`checkpoint=tinyllava:<dir>`, `stage.init_from=tinyllava:<dir>`).

    <dir>/config.json                        TinyLlavaConfig (model_type "tinyllava"): llm_model_name_or_path,
                                             vision_model_name_or_path(2), connector_type, vision_feature_layer,
                                             vision_feature_select_strategy (patch | cls_patch), image_aspect_ratio
                                             (pad | square | anyres), text_config, vision_config
    <dir>/tokenizer files                    saved beside config.json by their recipes
    <dir>/language_model/pytorch_model.bin   the causal LM's parameters (`model.*`, `lm_head.*`) + its config.json
    <dir>/vision_tower/pytorch_model.bin     the CLIP / SigLIP vision model's (`vision_model.*`) + its config.json
    <dir>/connector/pytorch_model.bin        `_connector.<i>.*` (their MLP is an nn.Sequential indexed as ours)
    <dir>/mores/language_model/…             LLaVA-Steering's MoReS (factory/interop/tinyllava_mores.py)

Their vision tower and LLM are plain transformers models, so each component folder is loaded with its own
`from_pretrained` (transformers reads a `.bin` with `torch.load(weights_only=True)`; passed explicitly) and checked
strictly (factory/model/loading.py); the connector's file is read with factory/safe_load.py. What the factory cannot
compute exactly (two towers, a resampler / Q-Former connector, anyres tiling, other intervention kinds) is refused
with the file and key, never approximated. `conv_version` (their chat template) is a training argument, not in
config.json: the template follows the LLM (phi → `phi`, llama → `vicuna_v1`, TinyLLaVA's `llama` is LLaVA-1.5's v1)
unless the caller names one (the `template` argument; a stage passes its own).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from factory.data.templates import V1Template, get_template
from factory.errors import FactoryError
from factory.interop.tinyllava_mores import has_mores, load_mores_weights, read_mores, steering_offset
from factory.model.llava import LlavaModel
from factory.model.llms import PADS_WITH_UNK, load_tokenizer
from factory.model.loading import check_loading_info, resolve_dtype
from factory.model.vision.base import CLIP_MEAN, CLIP_STD, HALF
from factory.registry import CHECKPOINT_IMPORTERS, CONNECTORS, VISION_ENCODERS
from factory.safe_load import load_torch_file
from factory.tuners import apply_tuning

WEIGHTS = "pytorch_model.bin"
VISION_NAMES = {"clip_vision_model": "hf_clip", "siglip_vision_model": "hf_siglip"}
DEFAULT_STATS = {"hf_clip": (CLIP_MEAN, CLIP_STD), "hf_siglip": (HALF, HALF)}  # their processors' published stats
# TinyLLaVA's vision_feature_select_strategy → the factory's vision.feature_select: their `patch` drops the first
# token whatever the tower (for SigLIP a patch token: 728 tokens at 384 px), the factory's `patch`.
FEATURE_SELECT = {"patch": "patch", "cls_patch": "full"}
# the template TinyLLaVA trains each LLM family with (its conv_version), as a factory template
TEMPLATE_FOR_LLM = {"phi": "phi", "llama": "vicuna_v1"}
CONNECTOR_PREFIX = "_connector."
# LLM families whose factory name pads with <unk> (Llama / Vicuna); others keep the tokenizer's own pad
LLM_NAMES = {"phi": "phi", "llama": "llama"}


def read_tinyllava_config(folder: Path) -> Dict[str, Any]:
    file = folder / "config.json"
    if not file.is_file():
        raise FactoryError(f"{folder} is not a TinyLLaVA checkpoint: config.json is missing. `tinyllava:<dir>` takes "
                           "the output folder of a TinyLLaVA Factory or LLaVA-Steering training run.")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FactoryError(f"{file} is not valid JSON ({err}).") from None
    if not isinstance(config, dict) or config.get("model_type") != "tinyllava":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise FactoryError(f"{file} describes a {kind!r} model; `tinyllava:<dir>` imports TinyLLaVA Factory folders "
                           "(model_type `tinyllava`). A llava-hf folder is imported with hf:<dir>.")
    return config


def component_dir(folder: Path, name: str) -> Path:
    """<folder>/<name>/ with its weights. A folder holding the whole model in one file (TinyLLaVA's `trainer.save_model`
    after a fine-tune, or a hub release with remote code) has no component folders: that layout is named."""
    sub = folder / name
    if (sub / WEIGHTS).is_file() or (sub / "model.safetensors").is_file():
        return sub
    whole = [f.name for f in (folder / WEIGHTS, folder / "model.safetensors") if f.is_file()]
    if whole:
        raise FactoryError(
            f"{folder} holds the whole TinyLLaVA model in {whole[0]} (the layout of a full fine-tune's "
            f"trainer.save_model or a hub release), not the per-component layout `tinyllava:<dir>` reads: "
            f"{name}/{WEIGHTS} is missing. Save the components with TinyLLaVA's recipe `save` (language_model/, "
            "vision_tower/, connector/), or load the model in TinyLLaVA and write each component's state_dict there.")
    raise FactoryError(f"{sub / WEIGHTS} is missing: a TinyLLaVA checkpoint keeps each component in "
                       "language_model/, vision_tower/ and connector/ (pytorch_model.bin in each).")


def sub_config(folder: Path, name: str, config: Dict[str, Any], key: str) -> Any:
    """The component's transformers config: <name>/config.json, else the `key` section of the main config.json."""
    if (folder / name / "config.json").is_file():
        return AutoConfig.from_pretrained(str(folder / name))
    section = config.get(key)
    if not isinstance(section, dict) or "model_type" not in section:
        raise FactoryError(f"{folder / name / 'config.json'} is missing and {folder / 'config.json'} has no "
                           f"`{key}` with a model_type, so the {name} cannot be built. Copy the component's "
                           "config.json from the training run.")
    values = dict(section)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def load_component(model_class: Any, path: Path, config: Any, dtype: torch.dtype, what: str) -> nn.Module:
    try:
        model, info = model_class.from_pretrained(str(path), config=config, dtype=dtype, weights_only=True,
                                                  attn_implementation="sdpa", output_loading_info=True)
    except (OSError, ValueError) as err:
        raise FactoryError(f"Could not load the {what} from {path}: {str(err).splitlines()[0][:300]}") from None
    check_loading_info(info, path, "tinyllava:<dir>", what)
    return model


# ------------------------------------------------------------------------------------------------ config translation
def vision_section(folder: Path, config: Dict[str, Any], vision_config: Any) -> Dict[str, Any]:
    where = folder / "config.json"
    if config.get("vision_model_name_or_path2"):
        raise FactoryError(f"{where}: vision_model_name_or_path2={config['vision_model_name_or_path2']!r} (a second "
                           "vision tower, TinyLLaVA's MoF) is not supported; the factory has one vision encoder.")
    kind = vision_config.model_type
    if kind not in VISION_NAMES:
        raise FactoryError(f"{folder / 'vision_tower' / 'config.json'}: vision model_type {kind!r} has no factory "
                           f"vision encoder (known: {', '.join(VISION_NAMES)}).")
    layer = config.get("vision_feature_layer", -2)
    strategy = config.get("vision_feature_select_strategy", "patch")
    if not isinstance(layer, int):
        raise FactoryError(f"{where}: vision_feature_layer={layer!r} must be one layer index (`vision.select_layer`).")
    if strategy not in FEATURE_SELECT:
        raise FactoryError(f"{where}: vision_feature_select_strategy={strategy!r} is unknown (patch | cls_patch).")
    name = VISION_NAMES[kind]
    mean, std = preprocessor_stats(folder, name)
    return {"name": name, "path": None, "select_layer": layer, "image_size": int(vision_config.image_size),
            "image_aspect": image_aspect(config.get("image_aspect_ratio", "square"), name, where),
            "feature_select": FEATURE_SELECT[strategy], "attn_implementation": "sdpa",
            "image_mean": [float(x) for x in mean], "image_std": [float(x) for x in std]}


def preprocessor_stats(folder: Path, name: str):
    """mean / std of a preprocessor_config.json saved with the checkpoint; TinyLLaVA itself loads the processor from
    vision_model_name_or_path (the hub tower), whose published statistics are the family's defaults."""
    for file in (folder / "preprocessor_config.json", folder / "vision_tower" / "preprocessor_config.json"):
        if file.is_file():
            try:
                stats = json.loads(file.read_text())
            except json.JSONDecodeError as err:
                raise FactoryError(f"{file} is not valid JSON ({err}).") from None
            if stats.get("image_mean") and stats.get("image_std"):
                return stats["image_mean"], stats["image_std"]
    return DEFAULT_STATS[name]


def image_aspect(ratio: str, vision_name: str, where: Path) -> str:
    """TinyLLaVA's image_aspect_ratio: `pad` pads to a square with the mean colour and then runs the processor (the
    factory's `pad`); `square` runs the processor alone: SigLIP's resizes to a square (`resize`, exact), CLIP's
    resizes the short side and centre-crops, which the factory has no form for (`pad` is used, as LLaVA trained,
    and the difference printed; square images are identical)."""
    if ratio == "pad":
        return "pad"
    if ratio == "square" and vision_name == "hf_siglip":
        return "resize"
    if ratio == "square":
        print(f"note: {where}: image_aspect_ratio=square with a CLIP processor resizes the short side and centre-crops;"
              " the factory pads to a square (vision.image_aspect=pad). Square images are preprocessed identically.",
              file=sys.stderr)
        return "pad"
    raise FactoryError(f"{where}: image_aspect_ratio={ratio!r} (anyres tiling) is not supported; the factory feeds "
                       "one square image per sample (pad | square).")


def connector_name(folder: Path, config: Dict[str, Any]) -> str:
    kind = str(config.get("connector_type") or "")
    if kind in ("linear", "identity") or re.fullmatch(r"mlp[1-4]x_gelu", kind):
        return kind
    raise FactoryError(f"{folder / 'config.json'}: connector_type={kind!r} has no exact factory connector (linear, "
                       "identity, mlp1x_gelu..mlp4x_gelu); a resampler, Q-Former, MoF or ReLU MLP cannot be imported.")


def load_connector(folder: Path, name: str, in_dim: int, out_dim: int) -> nn.Module:
    connector = CONNECTORS.get(name)({"name": name}, in_dim, out_dim)
    path = folder / "connector" / WEIGHTS
    if not list(connector.parameters()):
        return connector  # identity: nothing saved that matters
    state = load_torch_file(path) if path.is_file() else None
    if not isinstance(state, dict):
        raise FactoryError(f"{path} is missing or is not a state dict; a TinyLLaVA connector saves its "
                           "`_connector.*` parameters there.")
    theirs = {k[len(CONNECTOR_PREFIX):]: v for k, v in state.items() if k.startswith(CONNECTOR_PREFIX)}
    ours = connector.state_dict()
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(state) - {CONNECTOR_PREFIX + k for k in ours})
    shapes = [k for k in ours if k in theirs and tuple(theirs[k].shape) != tuple(ours[k].shape)]
    if missing or unexpected or shapes:
        raise FactoryError(f"{path} does not fit the {name} connector ({in_dim} → {out_dim}): missing "
                           f"{[CONNECTOR_PREFIX + k for k in missing][:4]}, unexpected {unexpected[:4]}, wrong shape "
                           f"{shapes[:4]}. Check connector_type in config.json.")
    connector.load_state_dict(theirs)
    return connector


def template_for(llm_type: str, folder: Path, template: Optional[str]) -> str:
    if template:
        return template
    if llm_type in TEMPLATE_FOR_LLM:
        return TEMPLATE_FOR_LLM[llm_type]
    raise FactoryError(f"{folder}: the LLM is a {llm_type!r} model; TinyLLaVA's template for it (its conv_version) "
                       f"has no factory template (known for: {', '.join(TEMPLATE_FOR_LLM)}). Name one, e.g. "
                       "checkpoint.import_model('tinyllava:<dir>', template='vicuna_v1'), or start a stage from it.")


# ------------------------------------------------------------------------------------------------------- the import
def import_tinyllava(path: Any, dtype: Optional[Any] = None, template: Optional[str] = None) -> LlavaModel:
    """A LlavaModel computing what the TinyLLaVA / LLaVA-Steering checkpoint in `path` computes; with LLaVA-Steering's
    MoReS attached (tuner=mores, positions_rule=llava_steering) when the folder has mores/language_model/."""
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        raise FactoryError(f"tinyllava:{path}: no such folder. `tinyllava:<dir>` takes a local TinyLLaVA Factory / "
                           "LLaVA-Steering output folder.")
    config = read_tinyllava_config(folder)
    torch_dtype = resolve_dtype(dtype)
    vision_dir, llm_dir = component_dir(folder, "vision_tower"), component_dir(folder, "language_model")
    tower_config = sub_config(folder, "vision_tower", config, "vision_config")
    vision_cfg = vision_section(folder, config, tower_config)
    connector = connector_name(folder, config)
    encoder = VISION_ENCODERS.get(vision_cfg["name"])
    tower = load_component(encoder.model_class, vision_dir, tower_config, torch_dtype, "vision tower")
    vision = encoder(vision_cfg, init="pretrained", dtype=None, tower=tower)
    text_config = sub_config(folder, "language_model", config, "text_config")
    llm = load_component(AutoModelForCausalLM, llm_dir, text_config, torch_dtype, "language model")
    llm_cfg = {"name": LLM_NAMES.get(text_config.model_type, "hf_causal_lm"), "path": None, "tokenizer": str(folder),
               "attn_implementation": "sdpa", "trust_remote_code": False}
    tokenizer = load_tokenizer(llm_cfg, "pretrained", PADS_WITH_UNK[llm_cfg["name"]])
    if tokenizer.pad_token_id is not None:
        llm.config.pad_token_id = tokenizer.pad_token_id
    llm_cfg["template"] = template_for(text_config.model_type, folder, template)
    projector = load_connector(folder, connector, vision.hidden_size, int(text_config.hidden_size)).to(torch_dtype)
    record = {"init": "pretrained", "init_from": f"tinyllava:{folder}", "vision": vision_cfg,
              "connector": {"name": connector}, "llm": llm_cfg}
    model = LlavaModel(vision=vision, connector=projector, llm=llm, tokenizer=tokenizer,
                       template=llm_cfg["template"], config=record)
    if has_mores(folder):
        attach_mores(model, folder)
    return model


def attach_mores(model: LlavaModel, folder: Path) -> None:
    """LLaVA-Steering's MoReS as the factory's tuner=mores with their position rule and offset; all else frozen."""
    template = get_template(model.template)
    if not isinstance(template, V1Template):
        raise FactoryError(f"{folder} has LLaVA-Steering MoReS weights, whose positions follow the chat prompt; the "
                           f"template {model.template!r} has no system prompt to place them by. Use phi or vicuna_v1.")
    options, layers = read_mores(folder, model.image_token_count)
    options["positions_offset"] = steering_offset(model.tokenizer, template.system)
    apply_tuning(model, options, {"vision": "frozen", "connector": "frozen", "llm": "tuner"})
    load_mores_weights(model.llm.mores, layers, folder)
    model.config["tuner"] = options
    model.requires_grad_(False)


CHECKPOINT_IMPORTERS.register("tinyllava")(import_tinyllava)
