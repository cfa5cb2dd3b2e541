"""GQA as LLaVA scores it: scripts/convert_gqa_for_eval.py then the GQA evaluation script's accuracy.

The converter turns each answer into ``text.rstrip('.').lower()`` (every trailing period, no whitespace strip); the
GQA eval.py (gqadataset.org) counts a question correct when that string equals the question's "answer" exactly, over
the questions whose "isBalanced" is true, and also reports the accuracy of "binary" questions (structural type other
than "query") and "open" ones (structural type "query").
"""
from __future__ import annotations

from typing import Any, Dict


def gqa_prediction(text: str) -> str:
    """convert_gqa_for_eval.py's prediction string."""
    return str(text).rstrip(".").lower()


def gqa_correct(text: str, question: Dict[str, Any]) -> bool:
    return gqa_prediction(text) == question["answer"]


def gqa_answer_type(question: Dict[str, Any]) -> str:
    """"open" for query questions, "binary" otherwise (verify/logical/compare/choose), as eval.py splits them."""
    structural = (question.get("types") or {}).get("structural")
    return "open" if structural == "query" else "binary"
