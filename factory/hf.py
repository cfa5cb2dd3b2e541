"""MoReS and the bottleneck adapter on a transformers `LlavaForConditionalGeneration` (docs/interop.md).

Neither tuner can be merged into the weights, so `python -m factory.export` writes the HF base model plus the tuner
files (factory/interop/tuner_files.py), and

    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from factory.hf import attach
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    handle = attach(model, out)                      # hooks on this instance only
    model.generate(**AutoProcessor.from_pretrained(out)(images=..., text=..., return_tensors="pt"))
    handle.detach()                                  # the plain HF model again (before save_pretrained)

makes `generate` steer exactly as the factory does. The factory's own modules (MoReS, BottleneckAdapter) are
re-created with the saved weights and hooked into the HF language model's decoder layers as the factory hooks them
into its LLM (same layer numbering, same projection names): the computation is the same code on the same tensors.
MoReS learns where the image tokens are from a forward pre-hook on the Llava model that reads `input_ids` (the image
token id) and the attention mask, before the language model runs; on decode steps with a KV cache the new tokens
hold no image token, so nothing is steered (prefill only, as in the factory). Positions come from each row's own
image tokens, so left-padded batches are steered like unpadded ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

import torch
from torch import nn

from factory.errors import FactoryError
from factory.interop.tuner_files import prefixed, read_tuner_files
from factory.model.llms import decoder_layers
from factory.tuners import BottleneckAdapter, MoReS, llm_arch


@dataclass
class AttachedTuner:
    """What `attach` returns: the tuner now hooked into the model; `detach()` restores the plain HF model."""

    tuner: str
    settings: Dict[str, Any]
    modules: List[tuple] = field(default_factory=list)   # (parent module, child name) added by attach
    handles: List[Any] = field(default_factory=list)      # hook handles registered by attach

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        for parent, name in self.modules:
            if name in parent._modules:
                delattr(parent, name)
        self.handles, self.modules = [], []


def language_model(hf_model: nn.Module) -> nn.Module:
    """The decoder stack of a LlavaForConditionalGeneration (`model.language_model` in transformers 5)."""
    base = getattr(hf_model, "model", None)
    lm = getattr(base, "language_model", None) or getattr(hf_model, "language_model", None)
    if lm is None or getattr(hf_model.config, "image_token_id", None) is None:
        raise FactoryError(
            f"factory.hf.attach expects a transformers LlavaForConditionalGeneration (with `model.language_model` and "
            f"`config.image_token_id`), not a {type(hf_model).__name__}. Load the exported folder with "
            f"LlavaForConditionalGeneration.from_pretrained(folder)."
        )
    return lm


def _check_fits(settings: Dict[str, Any], lm: nn.Module, layers: nn.ModuleList, folder: Any) -> None:
    config = lm.config
    expected = (settings.get("num_layers"), settings.get("hidden_size"), settings.get("llm_model_type"))
    actual = (len(layers), int(config.hidden_size), getattr(config, "model_type", None))
    if expected != actual:
        raise FactoryError(
            f"The tuner files in {folder} were written for an LLM with (layers, hidden size, model type) = "
            f"{expected}, but this model's language model has {actual}. Attach them to the model exported with them."
        )


def _claim(weights: Dict[str, torch.Tensor], used: set, prefix: str, module: nn.Module, folder: Any) -> None:
    """Load the entries under `prefix.` into `module` strictly and mark them used."""
    state = prefixed(weights, prefix)
    missing = sorted(set(module.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(module.state_dict()))
    if missing or unexpected:
        raise FactoryError(f"The tuner weights in {folder} do not fit {prefix!r}: missing {missing[:4]}, unexpected "
                           f"{unexpected[:4]}. Re-export the checkpoint.")
    module.load_state_dict(state)
    used.update(f"{prefix}.{k}" for k in state)


def _attach_mores(hf_model: nn.Module, lm: nn.Module, layers: nn.ModuleList, settings: Dict[str, Any],
                  weights: Dict[str, torch.Tensor], folder: Any, handle: AttachedTuner) -> set:
    opts = settings["options"]
    device = next(lm.parameters()).device
    with torch.device(device):
        mores = MoReS(int(settings["hidden_size"]), settings["layers"], rank=opts["rank"],
                      positions=opts["positions"], modality=opts["modality"], dropout=opts["dropout"],
                      positions_rule=opts.get("positions_rule", "image_span"),
                      positions_offset=opts.get("positions_offset", 1))
    used: set = set()
    _claim(weights, used, "mores", mores, folder)
    used.update(k for k in weights if k.split(".", 1)[0] in ("rotation", "weight", "bias"))  # for other readers
    lm.add_module("mores", mores)  # follows the model's .to() and .eval(); detach() removes it
    handle.modules.append((lm, "mores"))
    mores.train(hf_model.training)
    mores.attach(layers)
    image_token_id = int(hf_model.config.image_token_id)

    def observe(module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise FactoryError("MoReS attached with factory.hf.attach needs `input_ids` to find the image tokens (id "
                               f"{image_token_id}); call the model with input_ids, not inputs_embeds.")
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mores.observe_batch(image_mask=input_ids == image_token_id, attention_mask=attention_mask,
                            labels=kwargs.get("labels"))

    handle.handles.append(hf_model.register_forward_pre_hook(observe, with_kwargs=True))
    handle.handles.append(_Removal(mores.detach))
    return used


def _attach_adapter(lm: nn.Module, layers: nn.ModuleList, settings: Dict[str, Any],
                    weights: Dict[str, torch.Tensor], folder: Any, handle: AttachedTuner) -> set:
    opts, arch = settings["options"], llm_arch(lm, "adapter")
    used: set = set()
    for site in settings.get("sites", []):
        path, side = site["path"], site["side"]
        projection = path.rsplit(".", 1)[-1]
        if side != ("input" if projection in arch.mlp_in else "output"):
            raise FactoryError(f"{folder}: the adapter site {path} ({side}) does not match the adapter layout of "
                               f"{lm.config.model_type} (factory/tuners/adapter.py). Re-export the checkpoint.")
        try:
            proj = layers.get_submodule(path)
        except AttributeError:
            raise FactoryError(f"{folder}: the adapter site {path} does not exist in this model's decoder layers; "
                               "attach the tuner files to the model exported with them.") from None
        adapter = BottleneckAdapter(int(settings["hidden_size"]), opts["bottleneck"], opts["activation"],
                                    opts["dropout"])
        _claim(weights, used, f"{path}.adapter", adapter, folder)
        saved_dtype = weights[f"{path}.adapter.down.weight"].dtype
        adapter.to(device=proj.weight.device, dtype=saved_dtype)
        proj.add_module("adapter", adapter)
        handle.modules.append((proj, "adapter"))
        hook = proj.register_forward_pre_hook(adapter.on_input) if side == "input" else \
            proj.register_forward_hook(adapter.on_output)
        handle.handles.append(hook)
    if not used:
        raise FactoryError(f"{folder}: the adapter settings list no sites; re-export the checkpoint.")
    return used


class _Removal:
    """A hook-handle-like object that runs `fn` on remove()."""

    def __init__(self, fn):
        self.fn = fn

    def remove(self) -> None:
        self.fn()


def attach(hf_model: nn.Module, folder: Any) -> AttachedTuner:
    """Hook the MoReS or adapter tuner saved in `folder` (factory_tuner.json + factory_tuner.safetensors) into
    `hf_model`, a loaded LlavaForConditionalGeneration. Returns a handle whose `detach()` removes it again."""
    settings, weights = read_tuner_files(folder)
    lm = language_model(hf_model)
    if isinstance(getattr(lm, "mores", None), MoReS) or any(isinstance(m, BottleneckAdapter) for m in lm.modules()):
        raise FactoryError("This model already carries an attached factory tuner; call detach() on the handle "
                           "attach returned before attaching again.")
    layers = decoder_layers(lm)
    _check_fits(settings, lm, layers, folder)
    handle = AttachedTuner(tuner=settings["tuner"], settings=settings)
    try:
        if settings["tuner"] == "mores":
            used = _attach_mores(hf_model, lm, layers, settings, weights, folder, handle)
        else:
            used = _attach_adapter(lm, layers, settings, weights, folder, handle)
        unused = sorted(set(weights) - used)
        if unused:
            raise FactoryError(f"The tuner weights in {folder} hold tensors the {settings['tuner']} settings do not "
                               f"use ({', '.join(unused[:4])}); the files do not belong together. Re-export.")
    except BaseException:
        handle.detach()
        raise
    return handle


__all__ = ["AttachedTuner", "attach", "language_model"]
