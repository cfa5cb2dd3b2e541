"""Answer normalisation and per-benchmark metrics, following the official evaluation tools' published behaviour
(the `lenient` protocol's rules, and the metric helpers both protocols share). The command that scores an answer
file is factory/eval/score.py.

Pure functions on strings and numbers (no files, no model) so every rule is unit-testable:

* VQA accuracy (VQAv2, VizWiz, TextVQA): normalise, then ``min(#matching annotators / 3, 1)`` averaged over the
  10 leave-one-out subsets of the 10 human answers.
* GQA: exact match after lower-casing and stripping a final period.
* ScienceQA: parse the option letter; anything unparsable is wrong.
* POPE: first sentence, commas dropped, any word "no"/"not" → "no", otherwise "yes"; confusion-matrix metrics.
* MMMU: multiple-choice letter parsing (deterministic: unparsable is wrong instead of the official random guess).
* IconQA: exact match after stripping whitespace.
"""
from __future__ import annotations

import itertools
import re
from typing import Dict, Iterable, List, Optional, Sequence

# --------------------------------------------------------------------------------------------------------------
# VQA normalisation (the rules of the VQA challenge's evaluation, as described on visualqa.org/evaluation)
# --------------------------------------------------------------------------------------------------------------

# Punctuation replaced by a space (or deleted, see _strip_punctuation). Apostrophe and colon are deliberately
# absent: the official rules keep them ("don't", "3:30"); the period has its own rule (decimal points survive).
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                   "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})

# Canonical English contractions. Annotators and models often drop the apostrophe(s); every spelling with any subset
# of the apostrophes removed is mapped back to the canonical form below ("dont" → "don't", "couldntve" →
# "couldn't've"), which reproduces the official contraction table without listing each variant by hand.
_CANONICAL_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he'll", "he's", "how'd", "how'll", "how's", "isn't",
    "it'd", "it'd've", "it'll", "it's", "let's", "ma'am", "mightn't",
    "mightn't've", "might've", "mustn't", "must've", "needn't", "not've", "o'clock", "oughtn't", "'ow's'at",
    "shan't", "she'd", "she'd've", "she'll", "she's", "should've", "shouldn't", "shouldn't've", "somebody'd",
    "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've", "someone'll", "someone's",
    "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've", "there're", "there's",
    "they'd", "they'd've", "they'll", "they're", "they've", "'twas", "wasn't", "we'd", "we'd've", "we'll", "we're",
    "we've", "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd", "where's", "where've",
    "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't",
    "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've",
)
# The first-person forms (i'm, i'd, ...) are absent on purpose: the official table spells them with a capital "I" and
# answers are lower-cased first, so they never apply. Spellings that are ordinary words once the apostrophe is gone
# stay untouched ("its", "hell", "were", "well", ...), as in the official table; "cant" and "wont" are mapped.
_AMBIGUOUS_WITHOUT_APOSTROPHE = frozenset({"its", "hell", "were", "wed", "shell", "well", "lets", "shed"})


def _contraction_variants() -> Dict[str, str]:
    table: Dict[str, str] = {}
    for canonical in _CANONICAL_CONTRACTIONS:
        positions = [i for i, ch in enumerate(canonical) if ch == "'"]
        for k in range(1, len(positions) + 1):
            for dropped in itertools.combinations(positions, k):
                variant = "".join(ch for i, ch in enumerate(canonical) if i not in dropped)
                if variant not in _AMBIGUOUS_WITHOUT_APOSTROPHE and variant not in _CANONICAL_CONTRACTIONS:
                    table.setdefault(variant, canonical)
    return table


CONTRACTIONS = _contraction_variants()

_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its point)


def _strip_punctuation(text: str) -> str:
    """Punctuation rule of the VQA evaluation.

    A punctuation mark is deleted outright when it touches a space in the original answer (``"yes !"``) or when the
    answer contains a digit-comma-digit group (``"2,000"`` → ``"2000"``); otherwise it becomes a space
    (``"black-and-white"`` → ``"black and white"``). Finally periods are removed unless they precede a digit.
    """
    out = text
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in VQA_PUNCTUATION:
        if delete_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_DECIMAL.sub("", out)


def _digits_articles_contractions(text: str) -> str:
    """Lower-case, number words → digits, drop articles, restore missing apostrophes, collapse whitespace."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """The full VQA answer normalisation (the EvalAI answer processor): whitespace, punctuation, case, numbers,
    articles, contractions. Applied to predictions before scoring or writing a submission file."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_strip_punctuation(text))


def _textvqa_pre_tokenize(text: str) -> str:
    """TextVQA's evaluator first lower-cases, deletes commas and question marks, and splits the possessive "'s"."""
    return str(text).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """min(#other annotators giving ``prediction`` / 3, 1), averaged over the leave-one-out subsets of ``answers``.

    With 10 answers this is the VQA accuracy; with fewer (some VizWiz/TextVQA rows) the same definition applies.
    """
    if not answers:
        raise ValueError("leave_one_out_accuracy needs at least one human answer")
    matches = sum(1 for a in answers if a == prediction)
    total = 0.0
    for held_out in answers:
        others_matching = matches - (1 if held_out == prediction else 0)
        total += min(others_matching / 3.0, 1.0)
    return total / len(answers)


def vqa_accuracy(prediction: str, answers: Sequence[str], protocol: str = "vqa") -> float:
    """VQA accuracy of one prediction in [0, 1].

    ``protocol="vqa"`` (VQAv2, VizWiz) reproduces the official VQA evaluation: the prediction is normalised with the
    full processor (as the submission converter does), human answers are whitespace-stripped and, only when the
    annotators disagree, punctuation-normalised and the prediction normalised again (a no-op, idempotent).
    ``protocol="textvqa"`` reproduces the TextVQA evaluator: prediction and every human answer go through the
    pre-tokenisation and the full processor.
    """
    if protocol == "textvqa":
        pred = normalize_vqa_answer(_textvqa_pre_tokenize(prediction))
        gts = [normalize_vqa_answer(_textvqa_pre_tokenize(a)) for a in answers]
        return leave_one_out_accuracy(pred, gts)
    if protocol != "vqa":
        raise ValueError(f"unknown VQA protocol {protocol!r} (expected 'vqa' or 'textvqa')")
    pred = normalize_vqa_answer(prediction)
    gts = [str(a).replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(gts)) > 1:
        gts = [_strip_punctuation(a) for a in gts]
        pred = normalize_vqa_answer(pred)
    return leave_one_out_accuracy(pred, gts)


# --------------------------------------------------------------------------------------------------------------
# GQA, IconQA
# --------------------------------------------------------------------------------------------------------------

def normalize_gqa_answer(text: str) -> str:
    text = str(text).strip().lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def gqa_correct(prediction: str, answer: str) -> bool:
    return normalize_gqa_answer(prediction) == normalize_gqa_answer(answer)


def iconqa_correct(prediction: str, answer: str) -> bool:
    return str(prediction).strip() == str(answer).strip()


# --------------------------------------------------------------------------------------------------------------
# Multiple choice (ScienceQA, MMMU)
# --------------------------------------------------------------------------------------------------------------

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LETTER_ALONE = re.compile(r"^\(?([A-Z])\)?[.:)]?$")           # "B", "B.", "(B)", "B)"
_LETTER_THEN_TEXT = re.compile(r"^\(?([A-Z])[.:)]\s+\S")       # "B. the sun", "(B) the sun", "B: sun"
_THE_ANSWER_IS = re.compile(r"answer is:?\s*\(?([A-Z])\b\)?", re.IGNORECASE)


def parse_option_letter(text: str, num_choices: int) -> Optional[int]:
    """Index of the option letter a model answered with, or None when it cannot be parsed (counted wrong).

    Accepted: ``"B"``, ``"B."``, ``"(B)"``, ``"B. text"``, ``"The answer is B."``; only letters among the first
    ``num_choices`` count. Lower-case letters are not accepted (a bare "a" is an article, not an option).
    """
    text = str(text).strip()
    match = _LETTER_ALONE.match(text) or _LETTER_THEN_TEXT.match(text)
    if match is None:
        found = _THE_ANSWER_IS.findall(text)
        letters = {f.upper() for f in found}
        match_letter = letters.pop() if len(letters) == 1 else None
    else:
        match_letter = match.group(1)
    if match_letter is None:
        return None
    index = OPTION_LETTERS.index(match_letter)
    return index if index < num_choices else None


def parse_mmmu_choice(text: str, options: Sequence[str]) -> Optional[int]:
    """MMMU multiple-choice parsing: strip surrounding punctuation, look for "(X)", then a standalone "X", then (for
    long answers) the text of an option; when several candidates appear the last mentioned wins. None = unparsable.
    """
    letters = OPTION_LETTERS[: len(options)]
    response = " " + str(text).strip().strip(",.!?;:'").strip() + " "
    candidates = [i for i, ch in enumerate(letters) if f"({ch})" in response]
    if not candidates:
        candidates = [i for i, ch in enumerate(letters) if f" {ch} " in response or f" {ch}." in response
                      or f" {ch}," in response or f" {ch}:" in response]
    by_content = False
    if not candidates and len(response.split()) > 5:
        lowered = response.lower()
        candidates = [i for i, opt in enumerate(options) if str(opt).strip() and str(opt).lower() in lowered]
        by_content = True
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    # Several options mentioned: the one mentioned last is the conclusion ("A is wrong, so the answer is C").
    def last_position(i: int) -> int:
        if by_content:
            return response.lower().rfind(str(options[i]).lower())
        ch = letters[i]
        return max(response.rfind(f"({ch})"), response.rfind(f" {ch} "), response.rfind(f" {ch}."),
                   response.rfind(f" {ch},"), response.rfind(f" {ch}:"))
    return max(candidates, key=last_position)


# --------------------------------------------------------------------------------------------------------------
# POPE
# --------------------------------------------------------------------------------------------------------------

def parse_yes_no(text: str) -> str:
    """POPE's rule: keep the first sentence, drop commas; any word "no"/"not"/"No" → "no", everything else →
    "yes"."""
    text = str(text)
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split()
    return "no" if any(w in ("no", "not", "No", "NO", "Not") for w in words) else "yes"


def binary_metrics(predictions: Iterable[str], labels: Iterable[str]) -> Dict[str, float]:
    """Accuracy, precision, recall, F1 (positive class = "yes") and the share of "yes" predictions, in 0..100."""
    tp = fp = tn = fn = 0
    for pred, label in zip(predictions, labels):
        if pred == "yes":
            tp, fp = (tp + 1, fp) if label == "yes" else (tp, fp + 1)
        else:
            tn, fn = (tn + 1, fn) if label == "no" else (tn, fn + 1)
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * (tp + tn) / n if n else 0.0,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * (tp + fp) / n if n else 0.0,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n,
    }


def mean_percent(values: List[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else 0.0
