"""The lm-eval tasks that ship with the factory, and how `harness.tasks` names are turned into lm-eval task specs.

The shipped tasks live in factory/assets/lm_eval_tasks/: a task YAML in lm-eval's format over a JSONL file next to
it. lm-eval reads `dataset_kwargs.data_files` relative to the current folder, so a shipped task is handed to lm-eval
as its config dict with that path made absolute; any other name (mmlu, hellaswag, a group, or a task of a folder the
user adds with `harness.include_path`) goes to lm-eval's own task index unchanged.

`microworld_knowledge`: the micro-world LMs' text-only knowledge. Each document describes a held-out scene in words
(the caption the LMs read in pretraining) and asks one question about it; the choices are the question type's closed
answer set, scored by loglikelihood (multiple choice). The scenes come from `microworld_knowledge_docs` with its own
seed (not the training seed), so they are new to the LMs; a test checks that the shipped file is its output.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import yaml

from factory.data.microworld import ANSWERS, TEMPLATES, _question, _random_scene, caption
from factory.errors import FactoryError

TASK_DIR = Path(__file__).resolve().parent.parent / "assets" / "lm_eval_tasks"
KNOWLEDGE_SEED, KNOWLEDGE_DOCS = 2026, 60


def local_task_names() -> List[str]:
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


def local_task_config(name: str) -> Dict[str, Any]:
    """The config dict of a shipped task, its data file path made absolute (checked to exist)."""
    path = TASK_DIR / f"{name}.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    files = ((config.get("dataset_kwargs") or {}).get("data_files") or {})
    for split, file in list(files.items()):
        absolute = (path.parent / file).resolve()
        if not absolute.is_file():
            raise FactoryError(f"The lm-eval task {path} names the data file {file} (split {split!r}), which is "
                               f"missing: {absolute}. Reinstall the factory or restore the file.")
        files[split] = str(absolute)
    return config


def task_specs(tasks: Union[str, Sequence[str]]) -> List[Union[str, Dict[str, Any]]]:
    """`harness.tasks` (a comma-separated string or a list) as the list simple_evaluate takes."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if str(t).strip()]
    if not names:
        raise FactoryError("harness.tasks is empty: name lm-eval tasks, e.g. tasks=mmlu,hellaswag (or the shipped "
                           f"offline task: {', '.join(local_task_names())}).")
    local = set(local_task_names())
    return [local_task_config(n) if n in local else n for n in names]


def microworld_knowledge_docs(seed: int = KNOWLEDGE_SEED, count: int = KNOWLEDGE_DOCS) -> List[Dict[str, Any]]:
    """`count` documents {context, question, question_type, choices, label}, the question types in turn."""
    rng = random.Random(seed)
    docs: List[Dict[str, Any]] = []
    while len(docs) < count:
        key, qtype, _ = TEMPLATES[len(docs) % len(TEMPLATES)]
        scene = _random_scene(rng, prior=False)  # no prior: only the description can answer
        asked = _question(scene, key, rng)
        if asked is None:  # e.g. "What color is the circle?" when two circles are in the scene
            continue
        question, answer = asked
        choices = list(ANSWERS[qtype])
        docs.append({"id": len(docs), "context": caption(scene), "question": question, "question_type": qtype,
                     "choices": choices, "label": choices.index(answer)})
    return docs


def write_jsonl(docs: Sequence[Dict[str, Any]], path: Optional[Path] = None) -> Path:
    """Write `docs` (default: the shipped microworld_knowledge.jsonl) one JSON object a line."""
    path = Path(path or TASK_DIR / "microworld_knowledge.jsonl")
    path.write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in docs), encoding="utf-8")
    return path
