"""A factory LlavaModel as a transformers LlavaForConditionalGeneration folder (the llava-hf layout): config.json,
safetensors, the tokenizer with the `<image>` token, the processor (pad/resize, mean/std) and a chat template that
rebuilds the factory's prompt token for token.

What HF Llava cannot hold exactly is refused with the reason (EXPORTABLE in docs/interop.md), never approximated:
an open_clip / timm tower, a connector other than mlp2x_gelu, an LM head with a non-zero bias (Phi-2), an LLM still
carrying a tuner that is not merged here. Two self-checks run before anything is written: every factory tensor
sits under its mapped HF name, and the processor's prompt ids equal the factory's. factory/export.py is the command.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from factory.constants import IMAGE_MARKER
from factory.data.templates import V1Template, get_template
from factory.errors import FactoryError
from factory.interop.hf_llava import PROBE, chat_template_ids, to_hf_name, v1_chat_template
from factory.model.vision.base import HFVisionEncoder

# factory `vision.feature_select` → HF's vision_feature_select_strategy, for a tower with/without a CLS token: HF's
# "default" drops the first token, "full" keeps all (model/vision/base.py FEATURE_SELECTS).
STRATEGY = {("default", True): "default", ("default", False): "full", ("full", True): "full",
            ("full", False): "full", ("patch", True): "default", ("patch", False): "default"}


def check_exportable(model) -> None:
    """FactoryError naming what HF Llava cannot represent exactly."""
    if not isinstance(model.vision, HFVisionEncoder):
        raise FactoryError(
            f"Cannot export to HF Llava: the vision encoder is {type(model.vision).__name__} (open_clip / timm). HF "
            "Llava builds its vision tower from a transformers vision_config (CLIP, SigLIP); an open_clip or timm "
            "tower has none, so the folder could not be loaded. Train with vision=clip_l336 or siglip_so400m_384.")
    connector = model.connector
    layers = list(connector) if isinstance(connector, nn.Sequential) else []
    if not (len(layers) == 3 and isinstance(layers[0], nn.Linear) and isinstance(layers[1], nn.GELU)
            and layers[1].approximate == "none" and isinstance(layers[2], nn.Linear)
            and layers[0].bias is not None and layers[2].bias is not None):
        name = (model.config.get("connector") or {}).get("name", type(connector).__name__)
        raise FactoryError(
            f"Cannot export to HF Llava: the connector is {name!r}, but HF Llava's projector is exactly Linear → GELU → "
            "Linear with biases (the factory's mlp2x_gelu). A linear, identity or deeper MLP connector has no exact "
            "HF Llava form.")
    head = model.llm.get_output_embeddings()
    if getattr(head, "bias", None) is not None and bool(head.bias.detach().ne(0).any()):
        raise FactoryError(
            f"Cannot export to HF Llava: the LLM's lm_head has a non-zero bias (max |b| = "
            f"{float(head.bias.detach().abs().max()):.4g}; Phi-2 has one). HF Llava builds its own lm_head without "
            "a bias, so the exported model would compute different logits. Serve this model with the factory "
            "(eval.py / chat.py), or start from an LLM whose head has no bias.")


def check_names_map(model) -> None:
    """Every weight must have an HF Llava name; what has none belongs to a tuner that is not merged here."""
    unmapped = []
    for name in model.state_dict():
        try:
            to_hf_name(name)
        except FactoryError:
            unmapped.append(name)
    if unmapped:
        raise FactoryError(
            f"Cannot export to HF Llava: {len(unmapped)} weights have no place in it (first: {', '.join(unmapped[:3])}). "
            "They belong to a tuner that is not merged into the weights here (vision LoRA, MoReS or the adapter on "
            "another component); HF Llava would silently drop them.")


def merged_llm(model) -> nn.Module:
    """The LLM as a plain causal LM: a PEFT tuner (LoRA, IA3, OFT) merged into its weights."""
    llm = model.llm
    if hasattr(llm, "merge_and_unload"):
        llm = llm.merge_and_unload()
    return llm


def add_image_token(tokenizer, llm: nn.Module):
    """A copy of the tokenizer with `<image>` as a special token, and the LLM's embedding and head grown by its row,
    as llava-hf checkpoints have them. The new rows are zero: the embedding row is always replaced by image
    features, and the head row's logit (0) is suppressed in generation_config (`suppress_tokens`)."""
    tokenizer = copy.deepcopy(tokenizer)
    if IMAGE_MARKER not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_MARKER], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_MARKER)
    old_rows = llm.get_input_embeddings().weight.shape[0]
    if image_id >= old_rows:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            llm.get_input_embeddings().weight[old_rows:] = 0
            llm.get_output_embeddings().weight[old_rows:] = 0
    return tokenizer, image_id, list(range(old_rows, llm.get_input_embeddings().weight.shape[0]))


def chat_template_for(template_name: str) -> str:
    template = get_template(template_name)
    if isinstance(template, V1Template):
        return v1_chat_template(template.system, template.user, template.assistant)
    if template_name == "plain":  # stage 1: the prompt is the image alone
        return ("{%- for message in messages -%}{%- if message['role'] == 'user' and message['content'] is not "
                "string -%}{%- for c in message['content'] -%}{%- if c['type'] == 'image' -%}{{ '<image>' }}"
                "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}")
    raise FactoryError(f"Cannot export the chat template {template_name!r}: no Jinja form is written for it.")


def build_processor(model, tokenizer, strategy: str, chat_template: str) -> LlavaProcessor:
    vision = model.vision
    size = int(vision.image_size)
    # The PIL backend resizes exactly as the factory does (PIL bicubic on the padded uint8 image); the torchvision
    # backend interpolates tensors and gives other pixels.
    image_processor = LlavaImageProcessorPil(
        do_pad=vision.image_aspect == "pad", do_resize=True, size={"height": size, "width": size},
        resample=3, do_center_crop=False, crop_size={"height": size, "width": size}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=list(vision.image_mean),
        image_std=list(vision.image_std), do_convert_rgb=True)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=int(vision.model.config.patch_size), vision_feature_select_strategy=strategy,
                          chat_template=chat_template, image_token=IMAGE_MARKER,
                          num_additional_image_tokens=int(vision.prefix_tokens))


def hf_llava_from(model, llm: nn.Module, image_id: int, strategy: str) -> LlavaForConditionalGeneration:
    """HF Llava around the factory's modules (moved, not copied), checked name by name against WEIGHT_NAMES."""
    vision = model.vision
    config = LlavaConfig(vision_config=vision.model.config.to_dict(), text_config=llm.config.to_dict(),
                         image_token_index=image_id, image_seq_length=int(vision.num_tokens),
                         vision_feature_layer=int(vision.select_layer), vision_feature_select_strategy=strategy,
                         projector_hidden_act="gelu", multimodal_projector_bias=True,
                         tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)))
    with torch.device("meta"):  # the shell only; every module with weights is the factory's
        hf = LlavaForConditionalGeneration(config)
    hf.model.vision_tower = vision.model
    hf.model.multi_modal_projector.linear_1 = model.connector[0]
    hf.model.multi_modal_projector.linear_2 = model.connector[2]
    hf.model.language_model = getattr(llm, llm.base_model_prefix)
    weight = llm.get_output_embeddings().weight
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    head.weight = weight
    hf.lm_head = head
    ours = {name: t for name, t in model.state_dict().items() if name != "llm.lm_head.bias"}
    theirs = hf.state_dict()
    moved = {to_hf_name(name): t for name, t in ours.items()}
    wrong = [n for n, t in moved.items() if n not in theirs or theirs[n].data_ptr() != t.data_ptr()]
    extra = sorted(set(theirs) - set(moved))
    left = [n for n, t in theirs.items() if t.is_meta]
    if wrong or extra or left:
        raise FactoryError(f"Internal mapping check failed (not mapped: {wrong[:3]}, unfilled: {extra[:3]}, "
                           f"meta: {left[:3]}); please report this with the checkpoint's config.yaml.")
    return hf


def check_prompt_ids(model, processor, template_name: str) -> None:
    """The processor (chat template + `<image>` expansion + one tokenizer call) must give the factory's prompt."""
    ours = get_template(template_name).encode_prompt(PROBE, model.tokenizer, model.image_token_count)
    theirs = chat_template_ids(processor.tokenizer, processor.chat_template, IMAGE_MARKER, model.image_token_count)
    if ours != theirs:
        raise FactoryError(
            f"Cannot export: with this tokenizer the HF processor's prompt differs from the factory's {template_name!r} "
            f"prompt (factory {ours[:40]}…, processor {theirs[:40]}…). The tokenizer splits the text differently "
            "when it is tokenized in one call; serving the export would change the model's input.")


def write_hf_llava(model, folder: Path) -> Dict[str, Any]:
    """Write `model` (a LlavaModel whose LLM carries at most a PEFT tuner, merged here) into the existing, empty
    `folder`. The model's LLM is changed in place (merged, embedding grown by the `<image>` row): export a copy.
    Returns what was written (the facts docs/interop.md tabulates)."""
    check_exportable(model)
    llm = merged_llm(model)
    merged, model.llm = llm is not model.llm, llm
    check_names_map(model)
    tokenizer, image_id, added = add_image_token(model.tokenizer, llm)
    has_cls = model.vision.prefix_tokens > 0
    strategy = STRATEGY[(str(getattr(model.vision, "feature_select", "default")), has_cls)]
    template_name = str(model.template)
    processor = build_processor(model, tokenizer, strategy, chat_template_for(template_name))
    check_prompt_ids(model, processor, template_name)
    hf = hf_llava_from(model, llm, image_id, strategy)
    hf.generation_config.suppress_tokens = added or None  # the added rows must never be generated
    hf.generation_config.eos_token_id = tokenizer.eos_token_id
    hf.generation_config.pad_token_id = tokenizer.pad_token_id
    hf.generation_config.do_sample = False
    hf.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return {"image_token_index": image_id, "vision_feature_select_strategy": strategy,
            "vision_feature_layer": int(model.vision.select_layer), "template": template_name,
            "added_rows": added, "merged": merged}
