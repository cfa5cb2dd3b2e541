"""Data: LLaVA JSON/JSONL → image first (LLaVA's rule) → chat template (piecewise tokenization, token for token
LLaVA-1.5's / TinyLLaVA's sequences, `<image>` → N image tokens) → padded batches. `python -m factory.data.inspect`
shows what training tokenizes (docs/data.md).

The micro-world generator lives in factory.data.microworld (imported on demand: it is not needed to train on
real data).
"""
from factory.data.collate import collate
from factory.data.llava_json import LlavaJsonDataset
from factory.data.templates import (EncodedSample, Template, conversation_problem, encode_conversation, get_template,
                                    image_first_text, move_image_first)

__all__ = ["EncodedSample", "LlavaJsonDataset", "Template", "collate", "conversation_problem",
           "encode_conversation", "get_template", "image_first_text", "move_image_first"]
