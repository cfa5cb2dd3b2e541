"""`hf_clip`: transformers CLIPVisionModel (e.g. openai/clip-vit-large-patch14-336). CLS token dropped."""
from __future__ import annotations

from transformers import CLIPVisionModel

from factory.model.vision.base import CLIP_MEAN, CLIP_STD, HFVisionEncoder
from factory.registry import VISION_ENCODERS


@VISION_ENCODERS.register("hf_clip")
class HFClipEncoder(HFVisionEncoder):
    model_class = CLIPVisionModel
    default_mean = CLIP_MEAN
    default_std = CLIP_STD
    prefix_tokens = 1

    def _pre_blocks(self, tower, hidden):
        # CLIP normalises the embeddings before the first block; hidden_states[0] is taken after it.
        return tower.pre_layrnorm(hidden)
