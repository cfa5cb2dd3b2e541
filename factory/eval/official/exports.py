"""Submission files exactly as LLaVA's converters write them (haotian-liu/LLaVA, commit c121f04).

* VQAv2, scripts/convert_vqav2_for_submission.py: one row per question of the test question file, in its order,
  ``{"question_id", "answer": EvalAIAnswerProcessor(text)}``; a question without an answer gets "".
* VizWiz, scripts/convert_vizwiz_for_submission.py: one row per question of the question file, in its order,
  ``{"image", "answer": EvalAIAnswerProcessor(text)}``; every question must have an answer.
* MM-Vet, scripts/convert_mmvet_for_eval.py: ``{"v1_<question_id>": text}`` (the prefix is always added), indented
  by 2.
Without a question file the answers' own order is used (VQAv2 and VizWiz).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from factory.errors import FactoryError
from factory.eval import annotations as ann
from factory.eval.official.answer_processing import evalai_answer

Rows = List[Dict[str, Any]]


def _question_rows(path: Path, what: str) -> Rows:
    doc = ann.read_json_or_jsonl(path, what)
    rows = doc.get("questions", []) if isinstance(doc, dict) else doc
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "question_id" in r for r in rows):
        raise FactoryError(f"The {what} file {path} is not a list of questions with `question_id` (a LLaVA question "
                           f"jsonl, or the official questions JSON {{\"questions\": [...]}}).")
    return rows


def _write(out: Path, document: Any, indent: Optional[int] = None) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=indent))
    return out


def export_vqav2(predictions: Rows, out_dir: Path, test_questions: Optional[Path] = None) -> Path:
    answers = {str(r["question_id"]): r["text"] for r in predictions}
    if test_questions is None:
        ids = [r["question_id"] for r in predictions]
    else:
        ids = [q["question_id"] for q in _question_rows(test_questions, "VQAv2 test questions")]
        missing = sum(1 for i in ids if str(i) not in answers)
        if missing:
            print(f"warning: {missing} test question(s) have no prediction; submitted as empty answers")
    rows = [{"question_id": i, "answer": evalai_answer(answers[str(i)]) if str(i) in answers else ""} for i in ids]
    return _write(Path(out_dir) / "vqav2_test-dev_submission.json", rows)


def export_vizwiz(predictions: Rows, out_dir: Path, test_questions: Optional[Path] = None) -> Path:
    if test_questions is None:
        questions = predictions
        if not all("image" in r for r in predictions):
            raise FactoryError("VizWiz submission rows are keyed by image name, which these answers lack. Pass the "
                               "question file with --questions (submission_questions= in eval.py).")
    else:
        questions = _question_rows(test_questions, "VizWiz questions")
    answers = {str(r["question_id"]): r["text"] for r in predictions}
    missing = [q["question_id"] for q in questions if str(q["question_id"]) not in answers]
    if missing:
        raise FactoryError(f"{len(missing)} VizWiz question(s) of {test_questions} have no answer (e.g. "
                           f"{missing[:3]}); LLaVA's converter requires every question to be answered. Answer "
                           f"them first (eval.py resumes where it stopped).")
    rows = [{"image": q.get("image"), "answer": evalai_answer(answers[str(q["question_id"])])} for q in questions]
    return _write(Path(out_dir) / "vizwiz_submission.json", rows)


def export_mmvet(predictions: Rows, out_dir: Path, test_questions: Optional[Path] = None) -> Path:
    result = {f"v1_{r['question_id']}": r["text"] for r in predictions}
    return _write(Path(out_dir) / "mmvet_results.json", result, indent=2)
