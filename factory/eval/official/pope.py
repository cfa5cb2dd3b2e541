"""POPE as LLaVA's llava/eval/eval_pope.py scores it (haotian-liu/LLaVA, commit c121f04).

The answer is "no" exactly when, after keeping the text before the first "." and deleting commas, one of the pieces
of a split on single spaces is `No`, `not` or `no` (case-sensitive); everything else is "yes" — "NO", "Nope.",
"No\\nthere is none" (no space after the word) and the empty answer included. The metrics are the file's
accuracy, precision, recall, F1 and yes-ratio with "yes" as the positive class.
"""
from __future__ import annotations

NO_WORDS = ("No", "not", "no")


def pope_answer(text: str) -> str:
    """"yes" or "no", eval_pope.py's reading of one answer."""
    text = str(text)
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in words for w in NO_WORDS) else "yes"
