"""Evaluations that train.py runs on the final model of a run, registered by name (AFTER_TRAINING) and chosen by
the `name` key of configs/eval/*.yaml (`eval=microworld`, the default; `eval.enabled=false` skips it).

Contract of an entry: `evaluate(model, cfg) -> {"accuracy": float, "per_type": dict | None, "extra": dict}` or
None when the evaluation does not apply to this run (e.g. the micro-world questions for a model trained on other
data). The training recipe calls it on rank 0 with the model in eval mode and puts the numbers into its summary as
`<name>_accuracy`, `<name>_per_type` and `<name>_<key>` for every key of `extra`.
"""
from __future__ import annotations

import sys
import json
from pathlib import Path
from typing import Any, Dict, Optional

from factory.eval import microworld_reading as reading
from factory.eval.microworld import evaluate_microworld, format_table
from factory.registry import AFTER_TRAINING

GENERATION_KEYS = ("batch_size", "max_new_tokens", "limit")  # eval config keys passed on to generation


@AFTER_TRAINING.register("microworld")
def microworld_after_training(model, cfg) -> Optional[Dict[str, Any]]:
    """Held-out micro-world accuracy (data.eval.json): exact match per question type; POPE per sampling
    (data.eval.pope_json); text-only retention against the base LM (eval.retention_questions). Tables on stderr."""
    if cfg.data.get("name") != "microworld":
        return None  # the micro-world questions measure a model trained on the micro-world only
    eval_cfg = cfg.get("eval") or {}
    options = {k: eval_cfg[k] for k in GENERATION_KEYS if k in eval_cfg and eval_cfg[k] is not None}
    result = evaluate_microworld(model, cfg.data.eval.json, cfg.data.eval.image_folder, **options)
    print(format_table(result), file=sys.stderr, flush=True)
    extra: Dict[str, Any] = {}
    pope_json = cfg.data.eval.get("pope_json")
    if pope_json and Path(str(pope_json)).is_file():
        pope = evaluate_microworld(model, pope_json, cfg.data.eval.image_folder,
                                   **{k: v for k, v in options.items() if k != "limit"})
        print(format_table(pope), file=sys.stderr, flush=True)
        extra["pope"] = {s: {k: round(m[k], 1) for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
                         for s, m in pope["pope_by_sampling"].items()}
    questions = int(eval_cfg.get("retention_questions") or 0)
    if questions > 0:
        extra.update(retention(model, cfg, questions, options.get("batch_size", 16)))
    return {"accuracy": float(result["accuracy"]), "per_type": result.get("per_type"), "extra": extra}


def retention(model, cfg, questions: int, batch_size: int) -> Dict[str, Any]:
    """The first `questions` rows of eval.json read from their caption, no image (microworld_reading): the run's
    model against the base LM of `llm.path`; retention % = 100 · tuned / base over all rows."""
    entries = json.loads(Path(str(cfg.data.eval.json)).read_text())[:questions]
    rows = reading.reading_rows(entries)
    tuned = reading.per_type_percent(reading.model_reading(model, rows, batch_size=batch_size))
    base = reading.per_type_percent(reading.lm_reading(str(cfg.llm.path), model.tokenizer, model.template, rows))
    kept = round(100.0 * tuned["all"] / base["all"], 1) if base["all"] else None
    print(f"  text-only reading (retention): base {base['all']:.1f}  tuned {tuned['all']:.1f}  retention "
          f"{kept if kept is not None else 'n/a'} %  (n={len(rows)})", file=sys.stderr, flush=True)
    return {"retention": kept, "reading": {"base": base, "tuned": tuned}}
