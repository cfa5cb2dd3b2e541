"""transformers' LlavaForConditionalGeneration (the llava-hf layout) ↔ the factory's LlavaModel: the weight names,
the config translation, and the importer registered as `hf` (`stage.init_from=hf:<dir>`, `checkpoint=hf:<dir>`).

The two models compute the same function with the same tensors (tests/test_interop_hf.py: max |Δlogit| = 0.0 in
fp32); only the module names differ (WEIGHT_NAMES). The import therefore moves the loaded HF modules into the factory's
components instead of copying tensors: no second copy of a 7B model in memory, and nothing can be approximated.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

from factory.constants import IMAGE_TOKEN_INDEX
from factory.data.templates import get_template
from factory.errors import FactoryError
from factory.model.llava import LlavaModel
from factory.model.llms import PADS_WITH_UNK, load_tokenizer
from factory.model.loading import check_loading_info, resolve_dtype
from factory.registry import CHECKPOINT_IMPORTERS, TEMPLATES, VISION_ENCODERS

# factory state-dict prefix ↔ HF Llava state-dict prefix (transformers ≥ 5 module names; the files of older
# llava-hf checkpoints say `language_model.model.*` / `language_model.lm_head.*`, which transformers maps on load).
WEIGHT_NAMES: Tuple[Tuple[str, str], ...] = (
    ("vision.model.", "model.vision_tower."),
    ("connector.0.", "model.multi_modal_projector.linear_1."),
    ("connector.2.", "model.multi_modal_projector.linear_2."),
    ("llm.model.", "model.language_model."),
    ("llm.lm_head.", "lm_head."),
)
# HF vision_config.model_type → the factory's vision encoder (its tower class is the one HF Llava builds).
VISION_NAMES = {"clip_vision_model": "hf_clip", "siglip_vision_model": "hf_siglip"}
# HF `vision_feature_select_strategy` ↔ the factory's `vision.feature_select` (model/vision/base.py): HF's "default"
# drops the first token whatever the tower (for SigLIP a patch token), the factory's `patch`.
FEATURE_SELECT_FROM_HF = {"default": "patch", "full": "full"}


def to_hf_name(name: str) -> str:
    """The HF Llava name of a factory parameter (FactoryError for a name outside the mapping, e.g. a tuner's)."""
    for ours, theirs in WEIGHT_NAMES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise FactoryError(f"The factory weight {name!r} has no place in HF Llava (mapped prefixes: "
                       f"{', '.join(p for p, _ in WEIGHT_NAMES)}).")


def to_factory_name(name: str) -> str:
    for ours, theirs in WEIGHT_NAMES:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    raise FactoryError(f"The HF Llava weight {name!r} has no place in the factory's LlavaModel.")


# ------------------------------------------------------------------------------------------------ config translation
def read_llava_config(folder: Path) -> LlavaConfig:
    file = folder / "config.json"
    if not file.is_file():
        raise FactoryError(f"{folder} is not a HF Llava checkpoint: config.json is missing. `hf:<dir>` takes a folder "
                           "written by LlavaForConditionalGeneration.save_pretrained (the llava-hf layout).")
    try:
        model_type = json.loads(file.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise FactoryError(f"{file} is not valid JSON ({err}).") from None
    if model_type != "llava":
        raise FactoryError(f"{file} describes a {model_type!r} model; `hf:<dir>` imports `llava` checkpoints "
                           "(LlavaForConditionalGeneration, the llava-hf layout) only.")
    return LlavaConfig.from_pretrained(str(folder))


def read_preprocessor(folder: Path) -> Dict[str, Any]:
    """The image processor's settings: preprocessor_config.json (older saves) or the `image_processor` entry of
    processor_config.json (transformers ≥ 5)."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        file = folder / name
        if file.is_file():
            try:
                stats = json.loads(file.read_text())
            except json.JSONDecodeError as err:
                raise FactoryError(f"{file} is not valid JSON ({err}).") from None
            stats = stats.get("image_processor", stats)
            if "image_mean" in stats or "do_pad" in stats or "size" in stats:
                return stats
    raise FactoryError(f"{folder} has no image processor settings (preprocessor_config.json or processor_config.json), "
                       "so the image preprocessing (mean, std, pad or resize) cannot be read. Save the model's "
                       "processor into the folder (processor.save_pretrained).")


def translate_config(config: LlavaConfig, folder: Path, preprocessor: Dict[str, Any]) -> Dict[str, Any]:
    """The factory's vision / connector / llm config sections equivalent to a HF Llava config (FactoryError for
    what the factory's LlavaModel cannot compute exactly)."""
    where = folder / "config.json"
    vision_type = config.vision_config.model_type
    if vision_type not in VISION_NAMES:
        raise FactoryError(f"{where}: vision_config.model_type {vision_type!r} has no factory vision encoder (known: "
                           f"{', '.join(VISION_NAMES)}).")
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise FactoryError(f"{where}: vision_feature_layer {layer} concatenates several layers; the factory's vision "
                           "encoders select one layer (`vision.select_layer`).")
    strategy = config.vision_feature_select_strategy
    if strategy not in FEATURE_SELECT_FROM_HF:
        raise FactoryError(f"{where}: vision_feature_select_strategy {strategy!r} is unknown (default | full).")
    if config.projector_hidden_act != "gelu" or not config.multimodal_projector_bias:
        raise FactoryError(
            f"{where}: the projector (projector_hidden_act={config.projector_hidden_act!r}, multimodal_projector_bias="
            f"{config.multimodal_projector_bias}) is not the factory's mlp2x_gelu connector (gelu, with biases).")
    image_size = int(config.vision_config.image_size)
    return {
        "vision": {"name": VISION_NAMES[vision_type], "path": None, "select_layer": int(layer),
                   "image_size": image_size, "image_aspect": image_aspect(preprocessor, image_size, folder),
                   "feature_select": FEATURE_SELECT_FROM_HF[strategy], "attn_implementation": "sdpa",
                   **{key: [float(x) for x in preprocessor[key]] for key in ("image_mean", "image_std")
                      if preprocessor.get(key)}},
        "connector": {"name": "mlp2x_gelu"},
        "llm": {"name": llm_name(config.text_config.model_type), "path": None, "tokenizer": str(folder),
                "attn_implementation": "sdpa", "trust_remote_code": False},
    }


def llm_name(model_type: str) -> str:
    return model_type if model_type in PADS_WITH_UNK else "hf_causal_lm"


def image_aspect(preprocessor: Dict[str, Any], image_size: int, folder: Path) -> str:
    """`pad` when the processor pads to a square (LLaVA-1.5's expand2square), `resize` when it squashes to
    image_size². A processor that resizes the short side and centre-crops (the CLIPImageProcessor shipped with
    llava-hf/llava-1.5-*-hf) has no exact factory equivalent: `pad`, LLaVA-1.5's own training preprocessing, is used
    and the difference is printed (identical for square images)."""
    if preprocessor.get("do_pad"):
        return "pad"
    size = preprocessor.get("size") or {}
    if not preprocessor.get("do_center_crop") and size.get("height") == image_size == size.get("width"):
        return "resize"
    print(f"note: {folder / 'preprocessor_config.json'} resizes the short side and centre-crops (no padding); the "
          "factory pads to a square with the mean colour as LLaVA-1.5 trained (vision.image_aspect=pad). Square "
          "images are preprocessed identically; others differ by the crop.", file=sys.stderr)
    return "pad"


# ---------------------------------------------------------------------------------------------------- the template
def v1_chat_template(system: str, user: str = "USER:", assistant: str = "ASSISTANT:") -> str:
    """A Jinja chat template that renders the factory's v1 layout (templates.V1Template: `SYSTEM USER: <image>\\nq
    ASSISTANT: a<eos>USER: q2 ASSISTANT:`), images first in a turn as the factory's data puts them. The BOS is left
    to the tokenizer call, which adds it exactly when the factory's `bos` piece does."""
    quoted = system.replace("\\", "\\\\").replace("'", "\\'")
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        f"{{%- if loop.first -%}}{{{{ '{quoted} ' }}}}{{%- endif -%}}"
        f"{{{{ '{user} ' }}}}"
        "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
        "{%- for c in message['content'] -%}{%- if c['type'] == 'image' -%}{{ '<image>\\n' }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- for c in message['content'] -%}{%- if c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}{%- endfor -%}"
        "{%- endif -%}"
        f"{{{{ ' {assistant}' }}}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ ' ' }}{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
        "{%- for c in message['content'] -%}{%- if c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}{%- endfor -%}"
        "{%- endif -%}{{ eos_token }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


PROBE = [{"from": "human", "value": "<image>\nWhat is in the image?"}]
PROBE_MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]


def chat_template_ids(tokenizer, chat_template: str, image_token: str, num_image_tokens: int) -> list:
    """Token ids of the probe question as a HF Llava processor builds them (chat template → text, `<image>`
    expanded to the image tokens, one tokenizer call), with the image tokens written as IMAGE_TOKEN_INDEX."""
    text = tokenizer.apply_chat_template(PROBE_MESSAGES, chat_template=chat_template, add_generation_prompt=True,
                                         tokenize=False)
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    ids = tokenizer(text.replace(image_token, image_token * num_image_tokens)).input_ids
    return [IMAGE_TOKEN_INDEX if i == image_id else int(i) for i in ids]


def matching_template(folder: Path, tokenizer, num_image_tokens: int, preferred: str) -> Optional[str]:
    """The factory template whose prompt ids equal the folder's chat template's for a probe question, if any."""
    chat_template = tokenizer.chat_template
    file = folder / "chat_template.jinja"
    if file.is_file():
        chat_template = file.read_text()
    if not chat_template:
        return None
    theirs = chat_template_ids(tokenizer, chat_template, "<image>", num_image_tokens)
    # the family's usual template first: on a byte-level tokenizer the v1 variants give the same ids
    for name in sorted(TEMPLATES.names(), key=lambda n: n != preferred):
        if name != "plain" and get_template(name).encode_prompt(PROBE, tokenizer, num_image_tokens) == theirs:
            return name
    return None


# ------------------------------------------------------------------------------------------------------- the import
def load_hf_llava(folder: Path, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    try:
        model, info = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=dtype, output_loading_info=True,
                                                                    attn_implementation="sdpa")
    except (OSError, ValueError) as err:
        raise FactoryError(f"Could not load the HF Llava checkpoint in {folder}: {err}") from None
    check_loading_info(info, folder, "hf:<dir>", "HF Llava model")
    return model


def causal_lm_from(hf: LlavaForConditionalGeneration, folder: Path) -> nn.Module:
    """A causal LM (what the factory's `llm` is) around HF Llava's language model and lm_head: the modules are moved,
    not copied. An LM whose head has a bias (Phi) gets a zero bias: HF Llava's head has none, so this is exact."""
    text_config = hf.config.text_config
    with torch.device("meta"):  # only the wrapper is built; every module with weights is replaced below
        llm = AutoModelForCausalLM.from_config(text_config)
    base = getattr(llm, llm.base_model_prefix, None)
    if base is None or type(base) is not type(hf.model.language_model):
        raise FactoryError(f"{folder}: the language model {type(hf.model.language_model).__name__} does not fit "
                           f"{type(llm).__name__}.{llm.base_model_prefix}; this text model cannot be imported.")
    setattr(llm, llm.base_model_prefix, hf.model.language_model)
    old_head, weight = llm.get_output_embeddings(), hf.lm_head.weight
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=old_head.bias is not None, device=weight.device,
                     dtype=weight.dtype)
    head.weight = weight  # tied to the embedding when the checkpoint ties them
    if head.bias is not None:
        with torch.no_grad():
            head.bias.zero_()
    llm.set_output_embeddings(head)
    left = [name for name, t in list(llm.named_parameters()) + list(llm.named_buffers()) if t.is_meta]
    if left:
        raise FactoryError(f"{folder}: importing {type(llm).__name__} left {left[:3]} without weights.")
    return llm


def connector_from(hf: LlavaForConditionalGeneration) -> nn.Sequential:
    projector = hf.model.multi_modal_projector
    return nn.Sequential(projector.linear_1, nn.GELU(), projector.linear_2)  # = build_mlp(2, …), the same names


def import_hf_llava(path: Any, dtype: Optional[Any] = None, template: Optional[str] = None) -> LlavaModel:
    """A LlavaModel computing exactly what the HF Llava checkpoint in `path` computes. `template`: the chat
    template to use; None → the factory template whose prompt equals the folder's chat template (FactoryError when
    none does, naming what to do)."""
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        raise FactoryError(f"hf:{path}: no such folder. `hf:<dir>` takes a local folder in the llava-hf layout.")
    config = read_llava_config(folder)
    sections = translate_config(config, folder, read_preprocessor(folder))
    hf = load_hf_llava(folder, resolve_dtype(dtype))
    vision_cfg = sections["vision"]
    vision = VISION_ENCODERS.get(vision_cfg["name"])(vision_cfg, init="pretrained", dtype=None,
                                                     tower=hf.model.vision_tower)
    llm = causal_lm_from(hf, folder)
    tokenizer = load_tokenizer(sections["llm"], "pretrained", PADS_WITH_UNK.get(sections["llm"]["name"], False))
    if tokenizer.pad_token_id is not None:
        llm.config.pad_token_id = tokenizer.pad_token_id
    if template is None:
        preferred = "phi" if sections["llm"]["name"] == "phi" else "vicuna_v1"
        template = matching_template(folder, tokenizer, vision.num_tokens, preferred)
        if template is None:
            raise FactoryError(
                f"The chat template of {folder} builds a prompt that no factory template reproduces token for token "
                f"(compared: {', '.join(n for n in TEMPLATES.names() if n != 'plain')}). Training can start from "
                "this folder (stage.init_from=hf:<dir>, the stage's template is used); to evaluate or chat, train "
                "a stage from it or export a factory checkpoint (python -m factory.export), whose chat template "
                "maps exactly.")
    sections["llm"]["template"] = template
    config_record = {"init": "pretrained", "init_from": f"hf:{folder}", **sections}
    return LlavaModel(vision=vision, connector=connector_from(hf), llm=llm, tokenizer=tokenizer, template=template,
                      config=config_record)


CHECKPOINT_IMPORTERS.register("hf")(import_hf_llava)
