"""The VQA answer-processing steps exactly as the official tools run them.

Two processors share the tables below:

* ``vqa_punctuation`` + ``vqa_digits_articles`` = ``processPunctuation`` / ``processDigitArticle`` of the VQA
  evaluation (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py, commit a013f00 "Fixed processing
  answers bug");
* ``evalai_answer`` = ``EvalAIAnswerProcessor`` of LLaVA's llava/eval/m4c_evaluator.py (TextVQA scoring and the
  VQAv2 / VizWiz submission converters): lower-case, delete "," and "?", split "'s", then the same two steps.

Quirks kept on purpose (they change numbers):
* the period rule is meant as "a period not after a digit" but its look-behind is misspelt, so it is "a period not
  followed by a digit"; and the flag ``re.UNICODE`` is passed where ``re.sub`` takes its count, so at most 32 periods
  are removed;
* a punctuation mark is deleted (not replaced by a space) when it touches a space anywhere in the answer, or when the
  answer holds a digit-comma-digit group;
* the contraction table is applied after lower-casing, so its capitalised entries ("Im", "Ive", "Id've") never apply;
  it maps "somebody'd" to "somebodyd" (backwards) and has identity entries for "let's" and "she's".
"""
from __future__ import annotations

import re
from typing import Dict

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# re.UNICODE's integer value, which the official code passes as re.sub's `count` argument.
PERIOD_REMOVAL_LIMIT = 32

_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT_VQAEVAL = re.compile(r"(\d)(,)(\d)")
_DIGIT_COMMAS_DIGIT_EVALAI = re.compile(r"(?<=\d),+(?=\d)")

# Canonical spellings of the official contraction table. Each one is reached from every spelling that lacks exactly
# one of its apostrophes ("couldn't've" from "couldnt've" and "couldn'tve", never from "couldntve"): that rule
# generates the official table's 117 regular entries; the three irregular ones follow.
_CANONICAL = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "I'd've", "I'm", "I've",
    "isn't", "it'd", "it'd've", "it'll", "ma'am", "mightn't", "mightn't've", "might've", "mustn't", "must've",
    "needn't", "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd've", "should've", "shouldn't",
    "shouldn't've", "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've", "someone'll",
    "someone's", "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've", "there're",
    "there's", "they'd", "they'd've", "they'll", "they're", "they've", "'twas", "wasn't", "we'd've", "we've",
    "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd",
    "who'd've", "who'll", "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't",
    "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've",
)
_IRREGULAR = {"let's": "let's", "she's": "she's", "somebody'd": "somebodyd"}


def _contraction_table() -> Dict[str, str]:
    table: Dict[str, str] = {}
    for canonical in _CANONICAL:
        for i, ch in enumerate(canonical):
            if ch == "'":
                table[canonical[:i] + canonical[i + 1:]] = canonical
    table.update(_IRREGULAR)
    return table


CONTRACTIONS = _contraction_table()


def _punctuation(text: str, digit_comma_digit: re.Pattern) -> str:
    delete = digit_comma_digit.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The test looks at the answer as it came in, the replacement works on the running result.
        if delete or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=PERIOD_REMOVAL_LIMIT)


def vqa_punctuation(text: str) -> str:
    """vqaEval.py's processPunctuation."""
    return _punctuation(text, _DIGIT_COMMA_DIGIT_VQAEVAL)


def vqa_digits_articles(text: str) -> str:
    """vqaEval.py's processDigitArticle: lower-case, split on whitespace, number words → digits, drop articles,
    then the contraction table word by word, joined by single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def vqa_whitespace(text: str) -> str:
    """What vqaEval.py does to every answer first: newlines and tabs become spaces, then strip."""
    return str(text).replace("\n", " ").replace("\t", " ").strip()


def evalai_answer(text: str) -> str:
    """LLaVA's EvalAIAnswerProcessor (m4c_evaluator.py), used for TextVQA and the VQAv2/VizWiz submission files."""
    text = str(text).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_digits_articles(_punctuation(text, _DIGIT_COMMAS_DIGIT_EVALAI))
