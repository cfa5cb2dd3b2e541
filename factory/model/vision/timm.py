"""`timm`: a timm Vision Transformer (e.g. vit_base_patch16_224), prefix tokens (class / registers) dropped.

Config: ``arch`` = timm model name; ``path`` = optional local weights file (init=pretrained; without it timm fetches
its default pretrained weights); ``arch_overrides`` = extra timm.create_model keyword arguments. init=random|meta builds the model from its name with pretrained weights off.
`encode` stops after the selected block (timm's forward_intermediates with stop_early).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from factory.errors import FactoryError
from factory.model.loading import node_get
from factory.model.vision.base import HALF, VisionEncoder, block_index
from factory.registry import VISION_ENCODERS


@VISION_ENCODERS.register("timm")
class TimmEncoder(VisionEncoder):
    def __init__(self, cfg: Any, init: str, dtype: torch.dtype):
        import timm  # imported here so that registering the encoder costs nothing

        name, path = node_get(cfg, "arch"), node_get(cfg, "path")
        if not name:
            raise FactoryError("`vision.arch` must name the timm model (e.g. vit_base_patch16_224) for vision=timm.")
        kwargs = {"pretrained": init == "pretrained", "num_classes": 0}
        # `arch_overrides` are passed to timm.create_model (e.g. depth, embed_dim, img_size for a small variant).
        overrides = node_get(cfg, "arch_overrides", {})
        kwargs.update(OmegaConf.to_container(overrides) if isinstance(overrides, DictConfig) else dict(overrides))
        if init == "pretrained" and path:
            kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        try:
            with torch.device("meta") if init == "meta" else contextlib.nullcontext():
                model = timm.create_model(str(name), **kwargs)
        except (RuntimeError, ValueError, OSError) as err:
            raise FactoryError(
                f"timm could not build {name!r} (init={init}, path={path!r}): {err}. Check `vision.arch` against "
                "timm.list_models() and that `vision.path` is a readable weights file."
            ) from None
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "blocks"):
            raise FactoryError(f"timm model {name!r} is not a Vision Transformer; vision=timm needs a ViT.")
        data_cfg = timm.data.resolve_data_config({}, model=model)
        super().__init__(cfg, data_cfg.get("mean", HALF), data_cfg.get("std", HALF))
        self.model = model.to(dtype)
        self.image_size = int(model.patch_embed.img_size[0])
        self.num_tokens = int(model.patch_embed.num_patches)
        self.hidden_size = int(model.embed_dim)
        self.check_image_size(cfg)
        self.num_blocks = block_index(self.select_layer, len(model.blocks))

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.forward_intermediates(
            pixel_values.to(self.dtype), indices=[self.num_blocks - 1], stop_early=True, intermediates_only=True,
            output_fmt="NLC",
        )[0]
