"""Evaluations that train.py runs on the final model of a run, registered by name (AFTER_TRAINING) and chosen by
the `name` key of configs/eval/*.yaml (`eval=microworld`, the default; `eval.enabled=false` skips it).

Contract of an entry: `evaluate(model, cfg) -> {"accuracy": float, "per_type": dict | None}` or None when the
evaluation does not apply to this run (e.g. the micro-world questions for a model trained on other data). The
training recipe calls it on rank 0 with the model in eval mode and puts the numbers into its summary as
`<name>_accuracy` and `<name>_per_type`.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Optional

from factory.eval.microworld import evaluate_microworld, format_table
from factory.registry import AFTER_TRAINING

GENERATION_KEYS = ("batch_size", "max_new_tokens", "limit")  # eval config keys passed on to generation


@AFTER_TRAINING.register("microworld")
def microworld_after_training(model, cfg) -> Optional[Dict[str, Any]]:
    """Held-out micro-world accuracy (data.eval.json): exact match per question type, table on stderr."""
    if cfg.data.get("name") != "microworld":
        return None  # the micro-world questions measure a model trained on the micro-world only
    eval_cfg = cfg.get("eval") or {}
    options = {k: eval_cfg[k] for k in GENERATION_KEYS if k in eval_cfg and eval_cfg[k] is not None}
    result = evaluate_microworld(model, cfg.data.eval.json, cfg.data.eval.image_folder, **options)
    print(format_table(result), file=sys.stderr, flush=True)
    return {"accuracy": float(result["accuracy"]), "per_type": result.get("per_type")}
