"""The micro-world held-out benchmark: exact match per question type + POPE metrics on the existence questions.

eval.json is LLaVA conversation JSON with two extra keys per entry: ``question_type`` (color | shape | count |
position | existence) and the gold ``answer``. A prediction is correct when it equals the answer after the VQA
normalisation (case, punctuation, articles, number words: "Two." and "2" both match "two"); the existence answers are
also parsed with POPE's yes/no rule and reported as POPE metrics. pope.json (the same format, every row an
existence question with its ``pope_sampling``: random | popular | adversarial) is scored per sampling as POPE
reports it: accuracy, precision, recall, F1 and yes-ratio.
"""
from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from factory.errors import FactoryError
from factory.eval import answer_metrics
from factory.eval.annotations import join
from factory.eval.generate import answer_questions, batched, check_image_paths, load_questions, missing_images

QUESTION_TYPES = ("color", "shape", "count", "position", "existence")


def answers_match(prediction: str, answer: str) -> bool:
    return answer_metrics.normalize_vqa_answer(prediction) == answer_metrics.normalize_vqa_answer(answer)


def score_rows(pairs: Sequence[tuple]) -> Dict[str, Any]:
    """pairs of (prediction text, question row with `question_type` and `answer`) → accuracy, per_type, pope, n."""
    per_type: Dict[str, List[bool]] = defaultdict(list)
    pope_preds, pope_labels = [], []
    for text, question in pairs:
        qtype = question.get("question_type")
        if qtype is None or "answer" not in question:
            raise FactoryError(f"Micro-world question {question.get('question_id')} lacks `question_type` or "
                               f"`answer`; use the eval.json written by the micro-world generator.")
        per_type[qtype].append(answers_match(text, str(question["answer"])))
        if qtype == "existence":
            pope_preds.append(answer_metrics.parse_yes_no(text))
            pope_labels.append(str(question["answer"]).strip().lower())
    every = [ok for oks in per_type.values() for ok in oks]
    pope = answer_metrics.binary_metrics(pope_preds, pope_labels) if pope_preds else None
    by_sampling: Dict[str, tuple] = defaultdict(lambda: ([], []))
    for text, question in pairs:
        if question.get("pope_sampling"):
            preds, labels = by_sampling[str(question["pope_sampling"])]
            preds.append(answer_metrics.parse_yes_no(text))
            labels.append(str(question["answer"]).strip().lower())
    if by_sampling:
        pope_by_sampling = {s: answer_metrics.binary_metrics(*by_sampling[s]) for s in sorted(by_sampling)}
    return {"accuracy": answer_metrics.mean_percent(every),
            "per_type": {t: answer_metrics.mean_percent(per_type[t]) for t in sorted(per_type)},
            "per_type_n": {t: len(per_type[t]) for t in sorted(per_type)},
            "pope": pope, "n": len(every), **({"pope_by_sampling": pope_by_sampling} if by_sampling else {})}


def score_microworld(predictions, annotations: Path, questions: Optional[Path] = None, strict: bool = False):
    """Scorer of the BENCHMARKS entry: the annotations file is eval.json itself (answers live in the questions)."""
    truth = {str(q["question_id"]): q for q in load_questions(annotations)}
    joined = join(predictions, truth, "microworld", annotations, strict=strict)
    result = score_rows([(row["text"], q) for row, q in joined.pairs])
    return {**result, **joined.report()}


@torch.no_grad()
def evaluate_microworld(model, eval_json, image_folder, batch_size: int = 16, max_new_tokens: int = 8,
                        limit: Optional[int] = None, progress: bool = False) -> Dict[str, Any]:
    """Generate answers for eval.json (or pope.json; first `limit` entries) and score them. Returns {"accuracy",
    "per_type", "per_type_n", "pope", "n", "seconds", "examples"} and, for POPE rows, "pope_by_sampling" —
    accuracies in 0..100."""
    questions = load_questions(Path(eval_json))
    if limit is not None:
        questions = questions[: int(limit)]
    check_image_paths(questions, Path(image_folder))
    missing = missing_images(questions, Path(image_folder))
    if missing:
        raise FactoryError(f"{len(missing)} micro-world image(s) are missing under {image_folder} (e.g. "
                           f"{missing[:3]}). Regenerate the micro-world (scripts/build_microworld.py) or fix "
                           f"data.eval.image_folder.")
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    texts: List[str] = []
    try:
        chunks = batched(questions, batch_size)
        if progress:
            from tqdm import tqdm  # only when a progress bar is asked for

            chunks = tqdm(chunks, total=-(-len(questions) // batch_size), desc="micro-world eval", unit="batch")
        for chunk in chunks:
            texts.extend(answer_questions(model, chunk, Path(image_folder), max_new_tokens))
    finally:
        model.train(was_training)
    result = score_rows(list(zip(texts, questions)))
    result["seconds"] = time.perf_counter() - start
    result["examples"] = [{"question": q["text"], "answer": q.get("answer"), "prediction": t}
                          for q, t in list(zip(questions, texts))[:5]]
    return result


def format_table(result: Dict[str, Any]) -> str:
    """A small text table of the results, for logs and the final message of train.py."""
    lines = [f"micro-world eval: accuracy {result['accuracy']:.1f} (n={result['n']})"]
    for qtype, acc in result["per_type"].items():
        lines.append(f"  {qtype:<10} {acc:6.1f}  (n={result.get('per_type_n', {}).get(qtype, '?')})")
    pope_rows = [("existence", result["pope"])] if result.get("pope") else []
    pope_rows += sorted((result.get("pope_by_sampling") or {}).items())
    for name, p in pope_rows:
        lines.append(f"  POPE ({name}): acc {p['accuracy']:.1f}  precision {p['precision']:.1f}  "
                     f"recall {p['recall']:.1f}  F1 {p['f1']:.1f}  yes-ratio {p['yes_ratio']:.1f}")
    return "\n".join(lines)
