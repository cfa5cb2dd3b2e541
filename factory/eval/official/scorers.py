"""Answer-file scorers of the `official` protocol: the annotation readers and the id join of factory.eval.annotations,
then each benchmark's official rule (the sibling modules). Same signature as the lenient scorers in benchmarks.py.

Where an official script would refuse or count differently on an incomplete answer file (VQA asserts every question is
answered, GQA raises, ScienceQA counts a missing answer as FAILED), the score is over the answered questions, the
count is in ``unanswered`` and a warning names the difference; on a complete file the numbers are the official ones.
"""
from __future__ import annotations

import ast
import random
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional

from factory.errors import FactoryError
from factory.eval import annotations as ann
from factory.eval import answer_metrics
from factory.eval.official import DEFAULT_SEED, gqa, mmmu, pope, scienceqa, vqa

Rows = List[Dict[str, Any]]


def _warn_unanswered(joined: ann.Joined, name: str, official_behaviour: str) -> None:
    if joined.unanswered:
        print(f"warning: {joined.unanswered} {name} question(s) of the annotations have no prediction; the official "
              f"script {official_behaviour}. The score is over the {len(joined.pairs)} answered question(s).",
              file=sys.stderr)


def score_vqav2(predictions: Rows, annotations: Path, questions: Optional[Path] = None, strict: bool = False):
    joined = ann.join(predictions, ann.load_vqav2_records(annotations), "vqav2", annotations, strict=strict)
    _warn_unanswered(joined, "vqav2", "refuses a results file that does not answer every question")
    accs = [vqa.vqaeval_accuracy(row["text"], records) for row, records in joined.pairs]
    return {"accuracy": answer_metrics.mean_percent(accs), **joined.report()}


def score_vizwiz(predictions: Rows, annotations: Path, questions: Optional[Path] = None, strict: bool = False):
    predictions = ann.attach_from_questions(predictions, questions, "image", "vizwiz")
    joined = ann.join(predictions, ann.load_vizwiz_records(annotations), "vizwiz", annotations, key="image",
                      strict=strict)
    accs = [vqa.vqaeval_accuracy(row["text"], records, hold_out="position") for row, records in joined.pairs]
    return {"accuracy": answer_metrics.mean_percent(accs), **joined.report()}


def score_textvqa(predictions: Rows, annotations: Path, questions: Optional[Path] = None, strict: bool = False):
    joined = ann.join(predictions, ann.load_textvqa(annotations), "textvqa", annotations, strict=strict)
    accs = [vqa.textvqa_accuracy(row["text"], answers, row["question_id"]) for row, answers in joined.pairs]
    return {"accuracy": answer_metrics.mean_percent(accs), **joined.report()}


def score_gqa(predictions: Rows, annotations: Path, questions: Optional[Path] = None, strict: bool = False):
    joined = ann.join(predictions, ann.load_gqa_questions(annotations), "gqa", annotations, strict=strict)
    _warn_unanswered(joined, "gqa", "stops with 'no prediction for question ...'")
    balanced = [(row, q) for row, q in joined.pairs if q.get("isBalanced", True)]
    correct = [gqa.gqa_correct(row["text"], q) for row, q in balanced]
    result: Dict[str, Any] = {"accuracy": answer_metrics.mean_percent(correct), "n_balanced": len(balanced)}
    if balanced and all("types" in q for _, q in balanced):
        for kind in ("binary", "open"):
            result[kind] = answer_metrics.mean_percent([ok for ok, (_, q) in zip(correct, balanced)
                                                 if gqa.gqa_answer_type(q) == kind])
    return {**result, **joined.report()}


def score_pope(predictions: Rows, annotations: Path, questions: Optional[Path] = None, strict: bool = False):
    truth = ann.load_pope(annotations)
    for qid, row in truth.items():
        if row["label"] not in ("yes", "no"):
            raise FactoryError(f"POPE label of question {qid} in {annotations} is {row['label']!r}; labels must be "
                               f"'yes' or 'no' (eval_pope.py reads every label other than 'no' as yes).")
    joined = ann.join(predictions, truth, "pope", annotations, strict=strict)
    by_split: Dict[str, List[tuple]] = defaultdict(list)
    for row, gt in joined.pairs:
        by_split[gt.get("category", "all")].append((pope.pope_answer(row["text"]), gt["label"]))
    splits = {name: answer_metrics.binary_metrics([p for p, _ in pairs], [lab for _, lab in pairs])
              for name, pairs in sorted(by_split.items())}
    everything = [pair for pairs in by_split.values() for pair in pairs]
    overall = answer_metrics.binary_metrics([p for p, _ in everything], [lab for _, lab in everything])
    result = {**{k: overall[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")},
              "splits": splits if len(splits) > 1 else None, **joined.report()}
    if len(splits) > 1:  # LLaVA-1.5's tables report the F1 averaged over the splits that eval_pope.py prints
        result["f1_mean_over_splits"] = sum(m["f1"] for m in splits.values()) / len(splits)
    return result


def score_sqa(predictions: Rows, annotations: Path, questions: Optional[Path] = None, strict: bool = False):
    joined = ann.join(predictions, ann.load_sqa(annotations), "sqa", annotations, strict=strict)
    correct, correct_img, failed = [], [], 0
    for row, problem in joined.pairs:
        letter = scienceqa.sqa_letter(str(row["text"]))
        failed += letter == scienceqa.FAILED
        ok = scienceqa.sqa_index(letter, len(problem["choices"])) == int(problem["answer"])
        correct.append(ok)
        # eval_science_qa.py counts a question as an image question when its prompt holds "<image>", which LLaVA's
        # science answer files have exactly when the problem has an image.
        if problem.get("image"):
            correct_img.append(ok)
    return {"accuracy": answer_metrics.mean_percent(correct), "img_accuracy": answer_metrics.mean_percent(correct_img),
            "n_img": len(correct_img), "unparsable": failed, **joined.report()}


def _mmmu_options(gt: Dict[str, Any], qid: str, annotations: Path) -> List[str]:
    options = gt.get("options")
    if isinstance(options, str):  # the HF dataset stores options as a Python-literal string; MMMU's code eval()s it
        try:
            options = ast.literal_eval(options)
        except (ValueError, SyntaxError):
            options = None
    if not isinstance(options, list) or not options:
        raise FactoryError(f"MMMU question {qid} in {annotations} is multiple-choice but has no `options` list; the "
                           f"official parser needs the options to read the answer letter.")
    return [str(o) for o in options]


def score_mmmu(predictions: Rows, annotations: Path, questions: Optional[Path] = None, strict: bool = False,
               seed: int = DEFAULT_SEED):
    joined = ann.join(predictions, ann.load_labels(annotations, "mmmu", "answer"), "mmmu", annotations,
                      strict=strict)
    rng = random.Random(seed)
    correct, guessed = [], 0
    for row, gt in joined.pairs:
        if gt.get("question_type", "multiple-choice") == "multiple-choice":
            options = _mmmu_options(gt, str(row["question_id"]), annotations)
            state = rng.getstate()
            letter = mmmu.parse_choice(str(row["text"]), options, rng)
            guessed += rng.getstate() != state
            correct.append(mmmu.choice_correct(gt["answer"], letter))
        else:
            correct.append(mmmu.open_correct(gt["answer"], mmmu.parse_open(str(row["text"]))))
    return {"accuracy": answer_metrics.mean_percent(correct), "random_guesses": guessed, "seed": seed,
            **joined.report()}


def score_iconqa(predictions: Rows, annotations: Path, questions: Optional[Path] = None, strict: bool = False):
    """IconQA: exact match after stripping whitespace (PAPER.md §5), the same rule as `lenient`."""
    truth = ann.load_labels(annotations, "iconqa", "answer")
    joined = ann.join(predictions, truth, "iconqa", annotations, strict=strict)
    correct = [answer_metrics.iconqa_correct(row["text"], gt["answer"]) for row, gt in joined.pairs]
    return {"accuracy": answer_metrics.mean_percent(correct), **joined.report()}
