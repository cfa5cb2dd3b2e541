"""`open_clip`: the image tower of an open_clip ViT model (e.g. ViT-B-16), class token dropped.

Config: ``arch`` = open_clip model name (``ViT-B-16``, ``ViT-L-14-336``, ``hf-hub:org/repo``); ``path`` = pretrained tag
(``openai``, ``laion2b_s34b_b88k``) or a local checkpoint file, used when init=pretrained. init=random|meta builds the
architecture from its name with no weights. Only the visual tower is kept; `encode` stops after the selected block
(open_clip's forward_intermediates with stop_early).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from factory.errors import FactoryError
from factory.model.loading import node_get
from factory.model.vision.base import CLIP_MEAN, CLIP_STD, VisionEncoder, block_index
from factory.registry import VISION_ENCODERS


@VISION_ENCODERS.register("open_clip")
class OpenClipEncoder(VisionEncoder):
    def __init__(self, cfg: Any, init: str, dtype: torch.dtype):
        import open_clip  # imported here so that registering the encoder costs nothing

        name, path = node_get(cfg, "arch"), node_get(cfg, "path")
        if not name:
            raise FactoryError("`vision.arch` must name the open_clip model (e.g. ViT-B-16) for vision=open_clip.")
        if init == "pretrained" and not path:
            raise FactoryError(
                "`vision.path` must be an open_clip pretrained tag (e.g. openai) or a local checkpoint file when "
                "init=pretrained; use init=random to build the architecture without weights."
            )
        try:
            # device="meta" alone still initialises on CPU first; the meta context makes it instant
            with torch.device("meta") if init == "meta" else contextlib.nullcontext():
                model = open_clip.create_model(
                    str(name), pretrained=str(path) if init == "pretrained" else None,
                    device="meta" if init == "meta" else "cpu",
                )
        except (RuntimeError, ValueError, OSError) as err:
            raise FactoryError(
                f"open_clip could not build {name!r} with pretrained={path!r}: {err}. Check `vision.arch` against "
                "open_clip.list_models() and `vision.path` against open_clip.list_pretrained()."
            ) from None
        visual = model.visual
        if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
            raise FactoryError(f"open_clip model {name!r} has no ViT image tower; use a ViT-* model for open_clip.")
        stats = getattr(visual, "preprocess_cfg", {}) or {}
        super().__init__(cfg, stats.get("mean", CLIP_MEAN), stats.get("std", CLIP_STD))
        self.model = visual.to(dtype)
        grid = visual.grid_size
        self.image_size = int(visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size)
        self.num_tokens = int(grid[0] * grid[1])
        self.hidden_size = int(visual.transformer.width)
        self.check_image_size(cfg)
        self.num_blocks = block_index(self.select_layer, len(visual.transformer.resblocks))

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_intermediates(
            pixel_values.to(self.dtype), indices=[self.num_blocks - 1], stop_early=True, intermediates_only=True,
            output_fmt="NLC",
        )
        return out["image_intermediates"][0]  # prefix (class) token already removed
