"""`hf_siglip`: transformers SiglipVisionModel (e.g. google/siglip-so400m-patch14-384). No CLS token.

The pooling head stays in the module (the published 428,225,600 parameters of so400m include it) but is never run.
"""
from __future__ import annotations

from transformers import SiglipVisionModel

from factory.model.vision.base import HALF, HFVisionEncoder
from factory.registry import VISION_ENCODERS


@VISION_ENCODERS.register("hf_siglip")
class HFSiglipEncoder(HFVisionEncoder):
    model_class = SiglipVisionModel
    default_mean = HALF
    default_std = HALF
    prefix_tokens = 0
