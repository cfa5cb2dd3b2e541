"""Vision encoders; importing this package registers them in factory.registry.VISION_ENCODERS."""
from factory.model.vision import hf_clip, hf_siglip  # noqa: F401
from factory.model.vision.base import VisionEncoder

# open_clip and timm are optional extras: a missing package must not hide the HF encoders.
try:
    from factory.model.vision import open_clip  # noqa: F401
except ModuleNotFoundError as err:  # pragma: no cover
    if err.name != "open_clip":
        raise
try:
    from factory.model.vision import timm  # noqa: F401
except ModuleNotFoundError as err:  # pragma: no cover
    if err.name != "timm":
        raise

__all__ = ["VisionEncoder"]
