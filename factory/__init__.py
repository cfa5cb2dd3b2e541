"""The factory: compose LLaVA-style models (vision encoder → connector → LLM) from registered components and
train them in two stages with MoReS or PEFT tuners. See docs/architecture.md (the layers and which way they import).

`import factory` stays cheap (no torch): the two entry functions import their layer when called."""
from factory.errors import FactoryError

__version__ = "0.1.0"


def build_model(cfg, dtype=None):
    """Build a LlavaModel from a resolved config (see factory.model.build)."""
    from factory.model.build import build_model as _build  # imports torch + transformers: only when called

    return _build(cfg, dtype=dtype)


def load_checkpoint(path, **kwargs):
    """Rebuild a trained model from a checkpoint folder alone (see factory.checkpoint)."""
    from factory.checkpoint import load_checkpoint as _load  # imports torch + transformers: only when called

    return _load(path, **kwargs)


__all__ = ["FactoryError", "build_model", "load_checkpoint", "__version__"]
