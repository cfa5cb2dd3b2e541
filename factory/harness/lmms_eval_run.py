"""`python eval.py checkpoint=<run>/<stage> harness=lmms_eval tasks=<task>[,<task>] [limit=N]`: lmms-eval's tasks on a
factory checkpoint, in this process (registered as HARNESSES `lmms_eval`; options: configs/harness/lmms_eval.yaml).

The checkpoint is loaded as eval.py loads it and handed to lmms-eval's `simple_evaluate` as a `FactoryLMMS` instance
(factory/harness/lmms_eval_model.py), so no plugin registration is needed on this path. `tasks=factory_microworld`
writes the micro-world task from the checkpoint's own data.eval first (factory/harness/lmms_eval_microworld.py).
Results go to `<output_dir>` (default `<checkpoint>/eval/lmms_eval/`) as `results_<time>.json` and, per task,
`samples_<task>_<time>.jsonl`: a new file per run, so an earlier run's results are never overwritten.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import OmegaConf

from factory.errors import FactoryError
from factory.eval.cli import checkpoint_config, load_model, output_dir_for
from factory.harness.lmms_eval_microworld import TASK_NAME as MICROWORLD_TASK
from factory.harness.lmms_eval_microworld import write_microworld_task
from factory.harness.lmms_eval_model import lmms_class
from factory.registry import HARNESSES

HARNESS_NAME = "lmms_eval"


def task_names(value: Any) -> List[str]:
    """`tasks=a,b` (a string, or a list when Hydra parsed one) → ["a", "b"]; none is an error naming the key."""
    if value is None:
        names: List[str] = []
    elif isinstance(value, str):
        names = [n.strip() for n in value.split(",")]
    else:
        names = [str(n).strip() for n in value]
    names = [n for n in names if n]
    if not names:
        raise FactoryError("harness=lmms_eval needs tasks=<lmms-eval task>[,<task>] (e.g. tasks=mme, or "
                           f"tasks={MICROWORLD_TASK} for the checkpoint's micro-world questions).")
    return names


def microworld_files(cfg: Any, checkpoint: Path) -> tuple:
    """(eval.json, image folder) of the micro-world task: question_file= / image_folder= when given, else the
    checkpoint's own data.eval (as eval.py benchmark=microworld)."""
    data = (OmegaConf.to_container(OmegaConf.create(checkpoint_config(checkpoint)), resolve=True)
            .get("data") or {})
    eval_files = data.get("eval") or {}
    question_file = cfg.get("question_file") or eval_files.get("json")
    image_folder = cfg.get("image_folder") or eval_files.get("image_folder")
    if not question_file or not image_folder:
        raise FactoryError(f"tasks={MICROWORLD_TASK}: the checkpoint {checkpoint} names no data.eval json / "
                           "image_folder in its config.yaml; pass question_file=<eval.json> image_folder=<images>.")
    return Path(question_file), Path(image_folder)


def unique_stamp(output_dir: Path) -> str:
    """A UTC time stamp no results file in `output_dir` carries yet."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    candidate, n = stamp, 1
    while (output_dir / f"results_{candidate}.json").exists():
        n += 1
        candidate = f"{stamp}-{n}"
    return candidate


def evaluate(model, tasks: List[str], output_dir: Path, include_path: List[str], limit=None, batch_size: int = 8,
             max_new_tokens: int = 128, gen_kwargs=None) -> Dict[str, Any]:
    """Run lmms-eval's `tasks` on a loaded LlavaModel and write the results; returns the summary."""
    # lmms-eval is optional and takes seconds to import: only when this harness runs
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise FactoryError(f"Unknown lmms-eval task(s): {', '.join(unknown)}. Check the names (python -m lmms_eval "
                           "--tasks list), or add the folder of your task YAML to harness.include_path.")
    lm = lmms_class()(model=model, batch_size=batch_size, max_new_tokens=max_new_tokens)
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, gen_kwargs=gen_kwargs,
                              bootstrap_iters=0, log_samples=True)
    if results is None:  # a rank other than 0 of a multi-process run
        return {}
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = unique_stamp(output_dir)
    samples = results.pop("samples", {}) or {}
    for task, rows in samples.items():
        with (output_dir / f"samples_{task}_{stamp}.jsonl").open("x", encoding="utf-8") as sink:
            for row in rows:
                sink.write(json.dumps(row, default=str) + "\n")
    results_file = output_dir / f"results_{stamp}.json"
    with results_file.open("x", encoding="utf-8") as sink:
        sink.write(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    return {"harness": HARNESS_NAME, "results": results.get("results", {}), "results_file": str(results_file),
            "output_dir": str(output_dir)}


@HARNESSES.register(HARNESS_NAME)
def run(cfg) -> Dict[str, Any]:
    """eval.py's entry: `tasks`, `limit`, `batch_size`, `output_dir` from the root config, the rest from `harness`."""
    options = cfg.get("harness") or {}
    tasks = task_names(cfg.get("tasks") if cfg.get("tasks") is not None else options.get("tasks"))
    checkpoint = Path(str(cfg.checkpoint))
    output_dir = output_dir_for(cfg, checkpoint, HARNESS_NAME)
    include = options.get("include_path") or []
    include_path = [str(include)] if isinstance(include, str) else [str(p) for p in include]
    if MICROWORLD_TASK in tasks:
        question_file, image_folder = microworld_files(cfg, checkpoint)
        include_path.append(str(write_microworld_task(question_file, image_folder, output_dir / "tasks")))
    model = load_model(cfg)
    return evaluate(model, tasks, output_dir, include_path, limit=cfg.get("limit"),
                    batch_size=int(cfg.get("batch_size") or 8),
                    max_new_tokens=int(options.get("max_new_tokens") or 128),
                    gen_kwargs=options.get("gen_kwargs"))
