"""The MoReS weights LLaVA-Steering saves beside a TinyLLaVA checkpoint, and the visual positions its evaluation
steered (docs/interop.md, "TinyLLaVA Factory and LLaVA-Steering checkpoints").

    <folder>/mores/language_model/intkey_layer.<L>.comp.block_output.unit.pos.nunit.1#0.bin   one file per layer
    <folder>/mores/language_model/mores_pos_configs.json       intervention_positions (f4+l5), intervene_modality
                                                               (vis), img_embed_token_len (728 for SigLIP-384 `patch`)
    <folder>/mores/language_model/intervention_config.json     low_rank_dimension, dropout

Each intkey file (pyvene's intervention key: layer, component, unit) is a `torch.save`d dict: `weight` (W, d×D)
and `bias` (b, d) of their `learned_source` Linear, and `rotate_layer`, the materialised R (D×d). Their intervention
computes, on row vectors, base + (base·Wᵀ + b − base·R)·Rᵀ, that is h + R (W h + b − Rᵀ h): the factory's MoReS
formula, so the weights load one to one (R through `MoReSIntervention.load_rotation`, which recovers the householder
reflectors the factory trains; R comes back within ~1e-7). Only the rounding differs in half precision: they round
W h + b and Rᵀh to the model dtype before subtracting, the factory keeps them in fp32. The files are read with
`torch.load(weights_only=True)` (factory/safe_load.py): a pickle that needs code is refused, never run.

Positions: LLaVA-Steering computes them from the prompt text, not from where the image tokens are: the window starts
at `sys_length`, the token count of "<system> USER: <image>\\n{question} " minus that of "<image>\\n{question}" (both
tokenized with <image> as one token), and spans img_embed_token_len tokens; f4+l5 takes min(n // 2, 4) from its
front and min(n // 2, 5) from its back. With Phi-2's byte-level tokenizer the trailing space is a token of its own,
so the window starts one token after the image and its last position is the first text token after the image. The
factory reproduces this with `tuner.positions_rule=llava_steering` and `positions_offset` = sys_length − image start,
computed here once from the checkpoint's own tokenizer.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from factory.constants import IMAGE_MARKER, IMAGE_TOKEN_INDEX
from factory.errors import FactoryError
from factory.safe_load import load_torch_file

MORES_DIR = Path("mores") / "language_model"
POS_CONFIG, INTERVENTION_CONFIG = "mores_pos_configs.json", "intervention_config.json"
_KEY = re.compile(r"^intkey_layer\.(\d+)\.comp\.([A-Za-z_]+)\..*\.bin$")
PROBE_QUESTION = "What is shown in the image?"


def tinyllava_prompt_ids(tokenizer: Any, text: str) -> List[int]:
    """TinyLLaVA's `tokenizer_image_token`: the text split at <image>, each chunk tokenized on its own, one
    IMAGE_TOKEN_INDEX between chunks; when the first chunk starts with BOS, BOS is kept once and the first token of
    every chunk is dropped (as their code does)."""
    chunks = [tokenizer(chunk).input_ids for chunk in text.split(IMAGE_MARKER)]
    bos = tokenizer.bos_token_id
    offset = 1 if chunks and chunks[0] and bos is not None and chunks[0][0] == bos else 0
    ids = [bos] if offset else []
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids


def steering_offset(tokenizer: Any, system: str, question: str = PROBE_QUESTION) -> int:
    """sys_length − image start for LLaVA-Steering's prompt layout ("<system> USER: <image>\\n{q} "): 1 with
    Phi-2's tokenizer. Exact for every question whose tokens do not merge with the trailing space (a question
    ending in whitespace would)."""
    content = f"{IMAGE_MARKER}\n{question}"
    prompt_ids = tinyllava_prompt_ids(tokenizer, f"{system} USER: {content} ")
    sys_length = len(prompt_ids) - len(tinyllava_prompt_ids(tokenizer, content))
    return sys_length - prompt_ids.index(IMAGE_TOKEN_INDEX)


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FactoryError(f"{path} cannot be read as JSON ({err}); the LLaVA-Steering checkpoint is damaged.") from None
    if isinstance(value, list):  # LLaVA-Steering writes a list when a second position config was trained
        raise FactoryError(f"{path} holds {len(value)} position configs (a second MoReS with its own positions, "
                           "`intervention_positions_2`); the factory's MoReS has one position rule per model.")
    if not isinstance(value, dict):
        raise FactoryError(f"{path} is not a JSON object; the LLaVA-Steering checkpoint is damaged.")
    return value


def _intervention_options(root: Path) -> float:
    """The dropout of intervention_config.json (model.mores_config['llm'] as LLaVA-Steering saved it), after checking
    that every representation is a plain `mores` intervention on block outputs: their `norot_mores` (W2 not
    orthonormal), `m_mores` (two modalities in one intervention) and a non-linear `act_fn` compute something else."""
    dropout = 0.05
    path = root / INTERVENTION_CONFIG
    if not path.is_file():
        return dropout
    for rep in _read_json(path).get("representations", []):
        intervention = rep.get("intervention") or {}
        kind, act = intervention.get("type", "mores"), intervention.get("act_fn")
        if kind != "mores" or act not in (None, "linear") or rep.get("component", "block_output") != "block_output":
            raise FactoryError(
                f"{path}: an intervention of type {kind!r} (act_fn={act!r}, component={rep.get('component')!r}) is "
                "not the factory's MoReS; only type `mores` with the linear act_fn on `block_output` imports exactly.")
        dropout = float(intervention.get("dropout", dropout))
    return dropout


def has_mores(folder: Path) -> bool:
    return (folder / MORES_DIR).is_dir()


def read_mores(folder: Path, image_token_count: int) -> Tuple[Dict[str, Any], Dict[int, Dict[str, torch.Tensor]]]:
    """(tuner options for `tuner=mores`, {layer: {weight, bias, rotate_layer}}) from `folder/mores/language_model`.
    The options lack `positions_offset`, which needs the tokenizer (steering_offset)."""
    root = folder / MORES_DIR
    pos = _read_json(root / POS_CONFIG) if (root / POS_CONFIG).is_file() else None
    if pos is None:
        raise FactoryError(f"{root / POS_CONFIG} is missing: LLaVA-Steering writes the MoReS positions there, and "
                           "without it the steered positions are unknown. Copy the file from the training run.")
    spec = str(pos.get("intervention_positions", ""))
    if not re.fullmatch(r"f\d+\+l\d+|f\d+|l\d+", spec):
        raise FactoryError(f"{root / POS_CONFIG}: intervention_positions={spec!r} is not supported (the factory "
                           "reproduces fN+lM, fN and lM; `uniformN` is not implemented).")
    modality = str(pos.get("intervene_modality", ""))
    if modality != "vis":
        raise FactoryError(f"{root / POS_CONFIG}: intervene_modality={modality!r} is not supported; the factory "
                           "reproduces LLaVA-Steering's visual positions (`vis`) only.")
    span = pos.get("img_embed_token_len")
    if span is not None and int(span) != int(image_token_count):
        raise FactoryError(
            f"{root / POS_CONFIG}: img_embed_token_len={span}, but the imported vision tower gives {image_token_count} "
            f"image tokens. The checkpoint's vision_feature_select_strategy or image size does not match the one "
            f"it was trained with; check config.json (`patch` drops the first token: 728 for SigLIP at 384 px).")
    if pos.get("mores_share_weights") is False:
        raise FactoryError(f"{root / POS_CONFIG}: mores_share_weights=false (separate front and back interventions "
                           "per layer) is not supported by the factory's MoReS.")
    files = sorted(root.glob("intkey_*.bin"))
    if not files:
        raise FactoryError(f"{root} holds no intkey_*.bin files, so there are no MoReS weights to import.")
    layers: Dict[int, Dict[str, torch.Tensor]] = {}
    for path in files:
        match = _KEY.match(path.name)
        if match is None or match.group(2) != "block_output":
            raise FactoryError(f"{path.name}: the factory imports MoReS on decoder block outputs "
                               "(intkey_layer.<L>.comp.block_output.*.bin) only.")
        layer = int(match.group(1))
        if layer in layers:
            raise FactoryError(f"{root} holds two interventions for layer {layer}; the factory's MoReS has one per "
                               "layer.")
        state = load_torch_file(path)
        if not isinstance(state, dict) or not {"weight", "bias", "rotate_layer"} <= set(state):
            raise FactoryError(f"{path} is not a MoReS intervention (it needs `weight`, `bias` and `rotate_layer`).")
        layers[layer] = state
    ranks = {int(s["weight"].shape[0]) for s in layers.values()}
    if len(ranks) != 1:
        raise FactoryError(f"{root}: the interventions have different ranks {sorted(ranks)}.")
    dropout = _intervention_options(root)
    options = {"name": "mores", "rank": ranks.pop(), "layers": sorted(layers), "positions": spec,
               "modality": "vision", "dropout": dropout, "positions_rule": "llava_steering"}
    return options, layers


def load_mores_weights(mores: Any, layers: Dict[int, Dict[str, torch.Tensor]], folder: Path) -> None:
    """Copy W, b and R into the attached MoReS module (`model.llm.mores`)."""
    with torch.no_grad():
        for layer, state in layers.items():
            intervention = mores.interventions[str(layer)]
            for name, target in (("weight", intervention.project.weight), ("bias", intervention.project.bias)):
                if tuple(state[name].shape) != tuple(target.shape):
                    raise FactoryError(f"{folder / MORES_DIR}: layer {layer} `{name}` has shape "
                                       f"{tuple(state[name].shape)}, the LLM needs {tuple(target.shape)}.")
                target.copy_(state[name])
            intervention.load_rotation(state["rotate_layer"])
