"""Data: LLaVA JSON/JSONL → chat template (piecewise tokenization, `<image>` → N image tokens) → padded batches.

The micro-world generator lives in factory.data.microworld (imported on demand: it is not needed to train on
real data).
"""
from factory.data.collate import Collator, collate
from factory.data.llava_json import LlavaJsonDataset
from factory.data.templates import EncodedSample, Template, conversation_problem, get_template

__all__ = ["Collator", "EncodedSample", "LlavaJsonDataset", "Template", "collate", "conversation_problem",
           "get_template"]
