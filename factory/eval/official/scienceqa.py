"""ScienceQA as LLaVA's llava/eval/eval_science_qa.py scores it (haotian-liu/LLaVA, commit c121f04).

The answer text is read as it is (no stripping), against the script's default option letters A-E:
1. the whole text is one of A-E;
2. else the text has at least 3 characters, text[0] is one of A-E and text[1:3] == ". " ("B. The sun");
3. else the pattern ``The answer is ([A-Z]).`` (the final "." matches any character) occurs exactly once;
4. else FAILED.
A letter that is FAILED, or beyond the question's number of choices, becomes index -1 and is wrong.
So "B." (no space after the period), "(C)", "b" and "The answer is B" (nothing after the letter) are all wrong.
"""
from __future__ import annotations

import re

OPTION_LETTERS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def sqa_letter(text: str) -> str:
    """The letter eval_science_qa.py reads from an answer, or "FAILED"."""
    if text in OPTION_LETTERS:
        return text
    if len(text) >= 3 and text[0] in OPTION_LETTERS and text[1:3] == ". ":
        return text[0]
    found = _THE_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else FAILED


def sqa_index(letter: str, num_choices: int) -> int:
    """get_pred_idx: the option index of the letter, -1 when it is not among the first `num_choices` letters."""
    allowed = OPTION_LETTERS[:num_choices]
    return allowed.index(letter) if letter in allowed else -1
