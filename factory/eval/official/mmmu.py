"""MMMU as its official evaluation code parses and judges answers (MMMU-Benchmark/MMMU, mmmu/utils/eval_utils.py,
commit bb0b95a: parse_multi_choice_response, parse_open_response, eval_multi_choice, eval_open).

Multiple choice: strip , . ! ? ; : ' from both ends (one character kind after another, no whitespace), pad with
spaces; candidates are the letters written "(X)"; else those standing alone " X "; else, for answers of more than 5
words, the options whose text appears in the answer (case-insensitive). Several candidates: the one whose last
occurrence starts last (the first of them on a tie). None: a letter drawn at random — the official code seeds
Python's `random` with 42 once and draws in answer order; here the generator is `random.Random(seed)` shared by the
answers of one file, in file order, and the seed is reported.

Open: the answer is lower-cased and split into lines (the sentence split of the official code looks for an upper-case
letter after lower-casing, so only newlines split); from each line the shortest tail after "could be ", "so ",
"is ", "thus ", "therefore ", "final ", "answer ", "result " (and "=" on the last line) is kept; numbers found in
those tails are added; each string becomes a rounded float when it parses as one, else is lower-cased (one-character
strings padded with a space on either side). Correct when a gold number equals a parsed number, or a gold string is
contained in a parsed string.
"""
from __future__ import annotations

import random
import re
from typing import Any, Dict, List, Sequence, Union

_EDGE_CHARACTERS = (",", ".", "!", "?", ";", ":", "'")
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL_TAILS = (":", ",", ".", "!", "?", ";", "'")
_NUMBER_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUMBER_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")

Parsed = Union[str, float]


def choice_letters(options: Sequence[str]) -> List[str]:
    return [chr(ord("A") + i) for i in range(len(options))]


def parse_choice(response: str, options: Sequence[str], rng: random.Random) -> str:
    """The letter the official parser reads (a random letter from `rng` when it finds none)."""
    letters = choice_letters(options)
    for ch in _EDGE_CHARACTERS:
        response = response.strip(ch)
    response = f" {response} "
    candidates = [c for c in letters if f"({c})" in response]
    bracketed, by_letter = bool(candidates), True
    if not candidates:
        candidates = [c for c in letters if f" {c} " in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, option in zip(letters, options) if str(option).lower() in response.lower()]
        by_letter = False
    if not candidates:
        return rng.choice(letters)
    if len(candidates) == 1:
        return candidates[0]
    if not by_letter:
        starts = [response.lower().rfind(str(options[letters.index(c)]).lower()) for c in candidates]
    elif bracketed:
        starts = [response.rfind(f"({c})") for c in candidates]
    else:
        starts = [response.rfind(f" {c} ") for c in candidates]
    return candidates[starts.index(max(starts))]


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_open(text: str) -> List[Parsed]:
    """normalize_str: a number → [its float rounded to 2 decimals]; else [lower-case text] (1 char → padded)."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def _numbers_in(text: str) -> List[str]:
    return _NUMBER_WITH_COMMAS.findall(text) + _NUMBER_SCIENTIFIC.findall(text) + _NUMBER_SIMPLE.findall(text)


def _key_tails(response: str) -> List[str]:
    response = response.strip().strip(".").lower()
    lines = re.split(r"\.\s(?=[A-Z])|\n", response)
    tails = []
    for i, line in enumerate(lines):
        indicators = _KEY_INDICATORS + (("=",) if i == len(lines) - 1 else ())
        shortest = None
        for indicator in indicators:
            if indicator in line:
                tail = line.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL_TAILS:
            tails.append(shortest)
    return tails or [response]


def parse_open(response: str) -> List[Parsed]:
    """parse_open_response: the normalised candidate answers (a set, as a list)."""
    tails = _key_tails(response)
    candidates = list(tails)
    for tail in tails:
        candidates.extend(_numbers_in(tail))
    parsed: List[Parsed] = []
    for candidate in candidates:
        parsed.extend(normalize_open(candidate))
    return list(set(parsed))


def open_correct(gold: Any, parsed: Sequence[Parsed]) -> bool:
    """eval_open: gold is one answer string or a list of them."""
    golds: List[Parsed] = []
    for answer in (gold if isinstance(gold, list) else [gold]):
        golds.extend(normalize_open(str(answer)))
    for pred in parsed:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in golds):
                return True
        elif pred in golds:
            return True
    return False


def choice_correct(gold: Any, letter: str) -> bool:
    """eval_multi_choice: equal to the gold letter, or to one of them when gold is a list."""
    return letter in gold if isinstance(gold, list) else gold == letter


def index_to_answer(options: Sequence[str]) -> Dict[str, str]:
    return dict(zip(choice_letters(options), options))
