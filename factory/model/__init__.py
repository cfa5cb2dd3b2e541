"""Model composition: vision encoders, connectors, LLMs and the LlavaModel that joins them."""
from factory.model.build import build_model
from factory.model.llava import LlavaModel

__all__ = ["build_model", "LlavaModel"]
