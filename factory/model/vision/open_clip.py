"""`open_clip`: the image tower of an open_clip ViT model (e.g. ViT-B-16), class token dropped.

Config: ``arch`` = open_clip model name (``ViT-B-16``, ``ViT-L-14-336``, ``hf-hub:org/repo``); ``path`` = pretrained tag
(``openai``, ``laion2b_s34b_b88k``) or a local checkpoint file, used when init=pretrained. init=random|meta builds the
architecture from its name with no weights. Only the visual tower is kept; `encode` stops after the selected block
(open_clip's forward_intermediates with stop_early; the steps shared with timm: library_vit.py).
"""
from __future__ import annotations

from typing import Any

import torch

from factory.errors import FactoryError
from factory.model.vision.base import CLIP_MEAN, CLIP_STD
from factory.model.vision.library_vit import LibraryViTEncoder
from factory.registry import VISION_ENCODERS


@VISION_ENCODERS.register("open_clip")
class OpenClipEncoder(LibraryViTEncoder):
    library, example = "open_clip", "ViT-B-16"
    not_a_vit = "open_clip model {name!r} has no ViT image tower; use a ViT-* model for open_clip."

    def check_source(self, path: Any, init: str) -> None:
        if init == "pretrained" and not path:
            raise FactoryError(
                "`vision.path` must be an open_clip pretrained tag (e.g. openai) or a local checkpoint file when "
                "init=pretrained; use init=random to build the architecture without weights."
            )

    def create(self, cfg: Any, name: str, path: Any, init: str):
        import open_clip  # optional and slow to import: only an open_clip encoder needs it

        model = open_clip.create_model(name, pretrained=str(path) if init == "pretrained" else None,
                                       device="meta" if init == "meta" else "cpu")
        return model.visual

    def build_error(self, name: str, path: Any, init: str, err: Exception) -> str:
        return (f"open_clip could not build {name!r} with pretrained={path!r}: {err}. Check `vision.arch` against "
                "open_clip.list_models() and `vision.path` against open_clip.list_pretrained().")

    def is_vit(self, tower) -> bool:
        return hasattr(tower, "transformer")

    def stats(self, tower):
        stats = getattr(tower, "preprocess_cfg", {}) or {}
        return stats.get("mean", CLIP_MEAN), stats.get("std", CLIP_STD)

    def geometry(self, tower):
        grid, size = tower.grid_size, tower.image_size
        return (int(size[0] if isinstance(size, tuple) else size), int(grid[0] * grid[1]),
                int(tower.transformer.width), len(tower.transformer.resblocks))

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.intermediates(pixel_values)["image_intermediates"][0]  # prefix (class) token already removed
