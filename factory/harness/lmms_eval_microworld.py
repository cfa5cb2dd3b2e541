"""The micro-world held-out questions as an lmms-eval task (`tasks=factory_microworld`), written on demand.

lmms-eval tasks are YAML files over a data set. The micro-world lives wherever a run generated it, so the task is
written next to the results from the checkpoint's own `data.eval` (eval.json + images): a JSONL file of the questions
(absolute image paths) and `factory_microworld.yaml`, whose functions are the ones below (lmms-eval's `!function`
imports them by their module path). Its `accuracy` is the exact-match rule of `eval.py benchmark=microworld`
(factory.eval.microworld.answers_match) in 0..100, so the two scores of one checkpoint are directly comparable.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from factory.constants import IMAGE_MARKER
from factory.data.images import open_image
from factory.errors import FactoryError
from factory.eval.generate import check_image_paths, load_questions, missing_images
from factory.eval.microworld import answers_match

TASK_NAME = "factory_microworld"
MAX_NEW_TOKENS = 8  # the default of eval.py benchmark=microworld (factory/eval/benchmarks.py)

TASK_YAML = """\
# Written by factory.harness.lmms_eval_microworld: the micro-world held-out questions as an lmms-eval task.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: generate_until
doc_to_visual: !function factory.harness.lmms_eval_microworld.doc_to_visual
doc_to_text: !function factory.harness.lmms_eval_microworld.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  until: []
  do_sample: false
process_results: !function factory.harness.lmms_eval_microworld.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def doc_to_visual(doc: Dict[str, Any]) -> List[Any]:
    """The question's image, opened as training and eval.py open it (factory.data.images.open_image)."""
    return [open_image(doc["image"])] if doc.get("image") else []


def doc_to_text(doc: Dict[str, Any], lmms_eval_specific_kwargs: Optional[Dict[str, Any]] = None) -> str:
    """The question without the image marker: the factory's model puts the marker first itself, as eval.py does."""
    kwargs = lmms_eval_specific_kwargs or {}
    text = doc["question"].replace(IMAGE_MARKER, "").strip()
    return f"{kwargs.get('pre_prompt', '')}{text}{kwargs.get('post_prompt', '')}"


def process_results(doc: Dict[str, Any], results: List[str]) -> Dict[str, float]:
    """100 when the answer matches after the VQA normalisation (eval.py's micro-world rule), else 0."""
    return {"accuracy": 100.0 if answers_match(results[0], str(doc["answer"])) else 0.0}


def write_microworld_task(eval_json: Path, image_folder: Path, task_dir: Path,
                          max_new_tokens: int = MAX_NEW_TOKENS) -> Path:
    """Write `<task_dir>/factory_microworld.yaml` and its questions file from a micro-world eval.json; returns
    task_dir (lmms-eval's include path). Every question is written (lmms-eval's `limit` selects the first N, as
    eval.py's does). Image paths are checked as eval.py checks them: inside `image_folder`, and present."""
    questions = load_questions(Path(eval_json))
    check_image_paths(questions, Path(image_folder))
    missing = missing_images(questions, Path(image_folder))
    if missing:
        raise FactoryError(f"{len(missing)} micro-world image(s) named in {eval_json} are missing under "
                           f"{image_folder} (e.g. {missing[:3]}). Regenerate the micro-world "
                           f"(scripts/build_microworld.py) or fix the checkpoint's data.eval.image_folder.")
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    data_file = task_dir / f"{TASK_NAME}.jsonl"
    with data_file.open("w", encoding="utf-8") as sink:
        for q in questions:
            if "answer" not in q or "question_type" not in q:
                raise FactoryError(f"Micro-world question {q['question_id']!r} ({q['_where']}) lacks `answer` or "
                                   f"`question_type`; use the eval.json written by the micro-world generator.")
            row = {"question_id": str(q["question_id"]), "question": q["text"], "answer": str(q["answer"]),
                   "question_type": q["question_type"],
                   "image": str((Path(image_folder) / q["image"]).resolve()) if q.get("image") else None}
            sink.write(json.dumps(row) + "\n")
    (task_dir / f"{TASK_NAME}.yaml").write_text(
        TASK_YAML.format(task=TASK_NAME, data_file=json.dumps(str(data_file.resolve())),
                         max_new_tokens=int(max_new_tokens)), encoding="utf-8")
    return task_dir
