"""`timm`: a timm Vision Transformer (e.g. vit_base_patch16_224), prefix tokens (class / registers) dropped.

Config: ``arch`` = timm model name; ``path`` = optional local weights file (init=pretrained; without it timm fetches
its default pretrained weights); ``arch_overrides`` = extra timm.create_model keyword arguments. init=random|meta
builds the model from its name with pretrained weights off. `encode` stops after the selected block (timm's
forward_intermediates with stop_early; the steps shared with open_clip: library_vit.py).
"""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from factory.model.loading import node_get
from factory.model.vision.base import HALF
from factory.model.vision.library_vit import LibraryViTEncoder
from factory.registry import VISION_ENCODERS


@VISION_ENCODERS.register("timm")
class TimmEncoder(LibraryViTEncoder):
    library, example = "timm", "vit_base_patch16_224"
    not_a_vit = "timm model {name!r} is not a Vision Transformer; vision=timm needs a ViT."

    def create(self, cfg: Any, name: str, path: Any, init: str):
        import timm  # optional and slow to import: only a timm encoder needs it

        kwargs = {"pretrained": init == "pretrained", "num_classes": 0}
        # `arch_overrides` are passed to timm.create_model (e.g. depth, embed_dim, img_size for a small variant).
        overrides = node_get(cfg, "arch_overrides", {})
        kwargs.update(OmegaConf.to_container(overrides) if isinstance(overrides, DictConfig) else dict(overrides))
        if init == "pretrained" and path:
            kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        return timm.create_model(name, **kwargs)

    def build_error(self, name: str, path: Any, init: str, err: Exception) -> str:
        return (f"timm could not build {name!r} (init={init}, path={path!r}): {err}. Check `vision.arch` against "
                "timm.list_models() and that `vision.path` is a readable weights file.")

    def is_vit(self, tower) -> bool:
        return hasattr(tower, "blocks")

    def stats(self, tower):
        import timm  # optional and slow to import: only a timm encoder needs it

        data_cfg = timm.data.resolve_data_config({}, model=tower)
        return data_cfg.get("mean", HALF), data_cfg.get("std", HALF)

    def geometry(self, tower):
        return (int(tower.patch_embed.img_size[0]), int(tower.patch_embed.num_patches), int(tower.embed_dim),
                len(tower.blocks))

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.intermediates(pixel_values)[0]
