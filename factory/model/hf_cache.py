"""The KV-cache keyword of Hugging Face causal LMs across the transformers versions this project supports.

transformers 5.24 renamed the forward argument and the output field `past_key_values` to `cache` (the old name still
works there but warns that it goes away in 5.40); 5.17 knows only `past_key_values`. The LLM is therefore called with
whichever name its own forward declares, and the cache is read from whichever field its output class has, so neither
version warns.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn


@functools.lru_cache(maxsize=None)
def _forward_takes_cache(model_type: type) -> bool:
    # inspect.signature follows functools.wraps (transformers' deprecate_kwarg) to the real, renamed signature.
    return "cache" in inspect.signature(model_type.forward).parameters


def cache_argument(llm: nn.Module) -> str:
    """`cache` where the LLM's forward declares it, else `past_key_values` (seen through a PEFT wrapper)."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    return "cache" if _forward_takes_cache(type(base)) else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache of an LLM output, read by its current field name (no deprecated-alias access)."""
    fields = getattr(output, "__dataclass_fields__", {})
    return output.cache if "cache" in fields else output.past_key_values
