"""VQA accuracy as the official tools compute it (VQAv2 and VizWiz: vqaEval.py; TextVQA: LLaVA's m4c evaluator).

vqaEval.py (GT-Vision-Lab/VQA, commit a013f00 "Fixed processing answers bug"), per question:
1. every human answer and the prediction: newlines/tabs → spaces, strip;
2. only if the human answers are NOT all identical: processPunctuation then processDigitArticle on every human
   answer and on the prediction. When they are all identical nothing is normalised, so "two" scores 0 against ten
   "2" (a known quirk, kept);
3. for each annotation record: min(1, #other records whose answer equals the prediction / 3), averaged. "Other
   records" are those not equal to the held-out record as a whole (answer, answer_id, confidence...): with the
   official annotations each record has its own answer_id, so exactly one record is held out at a time; records
   that are identical in every field are held out together, as in the official code.

TextVQA (llava/eval/m4c_evaluator.py, TextVQAAccuracyEvaluator): the EvalAI processor on the prediction and on the
10 human answers (always), then the same leave-one-out with one answer (by position) held out at a time.
"""
from __future__ import annotations

import json
from typing import Any, List, Sequence

from factory.errors import FactoryError
from factory.eval.official.answer_processing import (evalai_answer, vqa_digits_articles, vqa_punctuation,
                                                     vqa_whitespace)


def _record_rest(record: Any) -> str:
    """Everything in an annotation record except its answer, as a comparable string ('' for a bare string)."""
    if not isinstance(record, dict):
        return ""
    return json.dumps({k: v for k, v in record.items() if k != "answer"}, sort_keys=True, default=str)


def _answer_of(record: Any) -> str:
    return record["answer"] if isinstance(record, dict) else record


def vqaeval_accuracy(prediction: str, records: Sequence[Any], hold_out: str = "record") -> float:
    """Accuracy in [0, 1] of one prediction against one question's annotation records (dicts with "answer", as in
    the official annotations file, or bare strings). ``hold_out="record"`` leaves out every record equal to the
    held-out one as a whole (vqaEval.py); ``"position"`` leaves out exactly one record by its position (VizWiz,
    whose records carry no answer_id, so equal records would otherwise be left out together)."""
    if not records:
        raise ValueError("vqaeval_accuracy needs at least one human answer")
    answers = [vqa_whitespace(_answer_of(r)) for r in records]
    pred = vqa_whitespace(prediction)
    if len(set(answers)) > 1:
        answers = [vqa_digits_articles(vqa_punctuation(a)) for a in answers]
        pred = vqa_digits_articles(vqa_punctuation(pred))
    if hold_out not in ("record", "position"):
        raise ValueError(f"hold_out must be 'record' or 'position', not {hold_out!r}")
    keyed = [(a, _record_rest(r) if hold_out == "record" else i) for i, (a, r) in enumerate(zip(answers, records))]
    total = 0.0
    for held_out in keyed:
        matching = sum(1 for other in keyed if other != held_out and other[0] == pred)
        total += min(1.0, matching / 3.0)
    return total / len(keyed)


def textvqa_accuracy(prediction: str, answers: Sequence[str], question_id: Any = None) -> float:
    """TextVQAAccuracyEvaluator's score of one prediction (it asserts exactly 10 human answers)."""
    if len(answers) != 10:
        raise FactoryError(f"TextVQA question {question_id} has {len(answers)} human answers; the official TextVQA "
                           f"evaluator requires exactly 10. Score this file with protocol=lenient, or fix the "
                           f"annotations.")
    processed: List[str] = [evalai_answer(a) for a in answers]
    pred = evalai_answer(prediction)
    if pred not in processed:
        return 0.0
    total = 0.0
    for i in range(len(processed)):
        matching = sum(1 for j, a in enumerate(processed) if j != i and a == pred)
        total += min(1.0, matching / 3.0)
    return total / len(processed)
