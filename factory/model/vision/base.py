"""The common interface of vision encoders and the shared image preprocessing.

Every encoder exposes ``encode(pixel_values[B,3,H,W]) -> [B, N, Dv]`` (patch tokens of the layer `select_layer`,
no CLS / prefix tokens), ``num_tokens``, ``hidden_size``, ``image_size`` and ``image_transform(pil) -> [3,H,W]``.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import AutoConfig

from factory.errors import FactoryError
from factory.model.loading import from_pretrained_or_explain, load_arch, node_get

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
IMAGE_ASPECTS = ("pad", "resize")
# Published towers are often whole CLIP / SigLIP checkpoints (openai/clip-vit-large-patch14-336,
# google/siglip-so400m-patch14-384): loading their vision tower legitimately leaves these tensors unused. Anything
# else unused, or any tower tensor missing, is refused (model/loading.py check_loading_info).
WHOLE_MODEL_EXTRAS = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias")


def block_index(select_layer: int, num_layers: int, component: str = "vision") -> int:
    """Which block's output `select_layer` names, HF `hidden_states` convention.

    hidden_states[0] is the embedding output and hidden_states[i] the output of block i-1, so -1 is the last block
    and -2 (the LLaVA default) the second-to-last. Returns the number of blocks that must run (1..num_layers).
    """
    index = num_layers + 1 + select_layer if select_layer < 0 else select_layer
    if not 1 <= index <= num_layers:
        raise FactoryError(
            f"`{component}.select_layer` = {select_layer} is out of range for an encoder with {num_layers} blocks. "
            f"Use -1..-{num_layers} (from the end) or 1..{num_layers}; -2 (second-to-last) is the LLaVA default."
        )
    return index


class VisionEncoder(nn.Module):
    """Base class: subclasses set the attributes below in __init__ and implement `encode`."""

    num_tokens: int
    hidden_size: int
    image_size: int

    def __init__(self, cfg: Any, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.select_layer = int(node_get(cfg, "select_layer", -2))
        self.image_aspect = str(node_get(cfg, "image_aspect", "pad"))
        if self.image_aspect not in IMAGE_ASPECTS:
            raise FactoryError(
                f"`vision.image_aspect` = {self.image_aspect!r} is not supported; use one of {IMAGE_ASPECTS} "
                "(pad = pad to a square with the mean colour, resize = squash to a square)."
            )
        # Explicit mean/std in the config win over the model family's defaults.
        self.image_mean: Tuple[float, ...] = tuple(float(x) for x in node_get(cfg, "image_mean", mean))
        self.image_std: Tuple[float, ...] = tuple(float(x) for x in node_get(cfg, "image_std", std))

    def check_image_size(self, cfg: Any) -> None:
        """`vision.image_size` documents the resolution; it must agree with the loaded model's."""
        configured = node_get(cfg, "image_size")
        if configured is not None and int(configured) != self.image_size:
            raise FactoryError(
                f"`vision.image_size` = {configured} but the loaded vision model takes {self.image_size}×"
                f"{self.image_size} images. Set `vision.image_size={self.image_size}` or load a matching model."
            )

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encode(pixel_values)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def image_transform(self, image: Image.Image) -> torch.Tensor:
        """PIL image → normalised FloatTensor[3, image_size, image_size] (pad-to-square or resize first)."""
        image = image.convert("RGB")
        if self.image_aspect == "pad":
            image = pad_to_square(image, pad_colour(self.image_mean))
        image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        return (array - mean) / std


def pad_colour(image_mean: Sequence[float]) -> Tuple[int, ...]:
    """LLaVA's pad colour, `tuple(int(x*255) for x in image_processor.image_mean)`: truncated, not rounded
    (CLIP: 122, 116, 104; SigLIP: 127, 127, 127)."""
    return tuple(int(m * 255) for m in image_mean)


def pad_to_square(image: Image.Image, fill: Tuple[int, ...]) -> Image.Image:
    """Centre the image on a square canvas of the mean colour, as LLaVA's `expand2square` does: the short side is
    offset by (long - short) // 2. The canvas is refused above PIL's decompression-bomb limit (a thin strip would
    otherwise allocate long_side² pixels; factory.data.images also refuses extreme aspect ratios up front)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and side * side > limit:
        raise FactoryError(
            f"Padding a {width}×{height} image to a square (image_aspect=pad) needs a {side}×{side} canvas, above "
            f"the decompression-bomb limit of {limit:,} pixels (PIL's Image.MAX_IMAGE_PIXELS). Downscale the image, "
            f"or use vision.image_aspect=resize."
        )
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


# `vision.feature_select`: which tokens of the selected layer reach the connector.
#   default – the patch tokens (CLIP's CLS dropped, SigLIP's tokens all kept);
#   full    – every token, CLIP's CLS included (HF Llava's vision_feature_select_strategy="full");
#   patch   – the first token dropped whatever the tower (LLaVA / TinyLLaVA's `patch` and HF Llava's "default":
#             for SigLIP this drops a patch token, 728 tokens at 384 px instead of 729).
FEATURE_SELECTS = ("default", "full", "patch")


def tokens_dropped(cfg: Any, prefix_tokens: int) -> int:
    """How many leading tokens `vision.feature_select` drops from a tower whose output starts with `prefix_tokens`."""
    select = str(node_get(cfg, "feature_select", "default"))
    if select not in FEATURE_SELECTS:
        raise FactoryError(
            f"`vision.feature_select` = {select!r} is not supported; use one of {FEATURE_SELECTS} (default = patch "
            "tokens only, full = every token incl. CLS, patch = drop the first token whatever the tower)."
        )
    return {"default": prefix_tokens, "full": 0, "patch": 1}[select]


class HFVisionEncoder(VisionEncoder):
    """Shared code of the transformers ViT towers (CLIPVisionModel, SiglipVisionModel).

    The whole tower is kept (parameter counts and checkpoints match the published models), but `encode` runs only
    the blocks up to `select_layer`: it calls the embedding and the first k blocks itself instead of asking the
    model for all hidden states, so the blocks after the selected one, the post-layernorm and SigLIP's pooling head
    are never computed.
    """

    model_class: Any = None  # set by subclasses
    default_mean: Sequence[float] = HALF
    default_std: Sequence[float] = HALF
    prefix_tokens: int = 0  # tokens before the patches in the tower's output (CLIP: 1, the CLS token)

    def __init__(self, cfg: Any, init: str, dtype: torch.dtype, tower: Any = None):
        """`tower`: an already loaded `model_class` instance to wrap instead of loading one (the vision tower of an
        imported HF Llava checkpoint, factory/interop/hf_llava.py); `init` is then ignored."""
        super().__init__(cfg, *self._preprocess_stats(cfg, init))
        if tower is not None and not isinstance(tower, self.model_class):
            raise FactoryError(f"The vision tower is a {type(tower).__name__}, but `vision.name` selects an encoder "
                               f"for {self.model_class.__name__}.")
        self.model = tower if tower is not None else self._load(cfg, init, dtype)
        config = self.model.config
        self.hidden_size = int(config.hidden_size)
        self.image_size = int(config.image_size)
        self.feature_select = str(node_get(cfg, "feature_select", "default"))
        self.drop_tokens = tokens_dropped(cfg, self.prefix_tokens)
        self.num_tokens = (config.image_size // config.patch_size) ** 2 + self.prefix_tokens - self.drop_tokens
        self.num_blocks = block_index(self.select_layer, config.num_hidden_layers)
        self.check_image_size(cfg)

    def _preprocess_stats(self, cfg: Any, init: str):
        path = node_get(cfg, "path")
        if init == "pretrained" and path and (Path(str(path)) / "preprocessor_config.json").is_file():
            stats = json.loads((Path(str(path)) / "preprocessor_config.json").read_text())
            return stats.get("image_mean", self.default_mean), stats.get("image_std", self.default_std)
        return self.default_mean, self.default_std

    def _load(self, cfg: Any, init: str, dtype: torch.dtype) -> nn.Module:
        attn = str(node_get(cfg, "attn_implementation", "sdpa"))
        if init == "pretrained":
            path = node_get(cfg, "path")
            if not path:
                raise FactoryError("`vision.path` is empty; set it to a HF hub id or a local folder (or init=random).")
            return from_pretrained_or_explain(self.model_class, path, "vision.path", "vision encoder", dtype=dtype,
                                              attn_implementation=attn, unused_prefixes=WHOLE_MODEL_EXTRAS)
        values = load_arch(cfg, "vision")
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        config._attn_implementation = attn
        with torch.device("meta") if init == "meta" else contextlib.nullcontext():
            model = self.model_class(config)
        return model.to(dtype)

    def _tower(self) -> nn.Module:
        # transformers has moved the tower in and out of a `vision_model` attribute between releases.
        return getattr(self.model, "vision_model", self.model)

    def _pre_blocks(self, tower: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tower = self._tower()
        hidden = self._pre_blocks(tower, tower.embeddings(pixel_values.to(self.dtype)))
        for block in tower.encoder.layers[: self.num_blocks]:
            out = block(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden[:, self.drop_tokens:]

