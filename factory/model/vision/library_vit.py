"""The constructor steps the open_clip and timm encoders share: a ViT built by a model library from its name
(`vision.arch`), under the meta device for init=meta, its errors turned into a FactoryError naming the keys, and a
tower that exposes `forward_intermediates`, so that `encode` stops after the selected block (stop_early).

A subclass says how its library builds the tower (`create`) and reads its geometry (`geometry`); the rest is here.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence, Tuple

import torch
from torch import nn

from factory.errors import FactoryError
from factory.model.loading import node_get
from factory.model.vision.base import VisionEncoder, block_index


class LibraryViTEncoder(VisionEncoder):
    library: str = ""        # the registered name, also the library's (open_clip, timm)
    example: str = ""        # a model name for the messages
    not_a_vit: str = ""      # the message when the built model has no ViT tower ({name} is filled in)

    def __init__(self, cfg: Any, init: str, dtype: torch.dtype):
        name, path = node_get(cfg, "arch"), node_get(cfg, "path")
        if not name:
            raise FactoryError(f"`vision.arch` must name the {self.library} model (e.g. {self.example}) for "
                               f"vision={self.library}.")
        self.check_source(path, init)
        try:
            # device="meta" alone still initialises on CPU first; the meta context makes it instant
            with torch.device("meta") if init == "meta" else contextlib.nullcontext():
                tower = self.create(cfg, str(name), path, init)
        except (RuntimeError, ValueError, OSError) as err:
            raise FactoryError(self.build_error(str(name), path, init, err)) from None
        if not hasattr(tower, "forward_intermediates") or not self.is_vit(tower):
            raise FactoryError(self.not_a_vit.format(name=name))
        super().__init__(cfg, *self.stats(tower))
        self.model = tower.to(dtype)
        self.image_size, self.num_tokens, self.hidden_size, depth = self.geometry(tower)
        self.check_image_size(cfg)
        self.num_blocks = block_index(self.select_layer, depth)

    def intermediates(self, pixel_values: torch.Tensor) -> Any:
        """The library's forward_intermediates up to the selected block, tokens as [B, N, D] (prefix tokens off)."""
        return self.model.forward_intermediates(
            pixel_values.to(self.dtype), indices=[self.num_blocks - 1], stop_early=True, intermediates_only=True,
            output_fmt="NLC",
        )

    # ---- what a library says
    def check_source(self, path: Any, init: str) -> None:
        """Refuse a `vision.path` the library cannot use for this init mode (default: anything goes)."""

    def create(self, cfg: Any, name: str, path: Any, init: str) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def build_error(self, name: str, path: Any, init: str, err: Exception) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def is_vit(self, tower: nn.Module) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def stats(self, tower: nn.Module) -> Tuple[Sequence[float], Sequence[float]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def geometry(self, tower: nn.Module) -> Tuple[int, int, int, int]:  # pragma: no cover - abstract
        """(image_size, num_tokens, hidden_size, number of blocks)."""
        raise NotImplementedError
