"""`python eval.py checkpoint=<run>/instruct harness=lm_eval tasks=mmlu,hellaswag [limit=N] [compare_base=true]`.

Runs EleutherAI's lm-evaluation-harness (`lm_eval.simple_evaluate`) on the checkpoint's language model as its tuner
leaves it for text-only input (factory/harness/lm_eval_model.py), writes the harness's results JSON and, with
`compare_base=true`, the same tasks on the untuned base LLM (the checkpoint's config without its trained weights)
and the retention table: per task the base score, the tuned score and retention % = 100 · tuned / base (the paper's
Table 4 reading of "world knowledge kept").

Files, in the output folder (`output_dir`, default `<checkpoint>/eval/lm_eval`): `lm_eval_results.json` (the
harness's own result dict), `base_lm_eval_results.json`, `retention.json` and `retention.md`. The folder is keyed
like every eval output folder (factory/eval/output_folder.py): results made with other settings are never written
over (this run goes to a sibling folder and says so), and results of the same checkpoint and settings are reported
again without recomputing them.
"""
from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from factory.checkpoint import CONFIG_FILE, build_base_model, load_checkpoint, read_meta
from factory.errors import FactoryError
from factory.eval.cli import output_dir_for, pick_device, remote_code_opt_in
from factory.eval.output_folder import checkpoint_identity, file_sha256, keyed_output_dir
from factory.harness.lm_eval_model import FactoryTextLM
from factory.harness.lm_eval_tasks import task_specs
from factory.model.loading import cast_parameters, resolve_dtype
from factory.registry import HARNESSES
from factory.safe_load import check_remote_code

RESULTS, BASE_RESULTS, RETENTION_JSON, RETENTION_MD = (
    "lm_eval_results.json", "base_lm_eval_results.json", "retention.json", "retention.md")
# The score a task is compared on: the first of these its results report (multiple choice: acc; generation: em).
PRIMARY_METRICS = ("acc,none", "exact_match,strict-match", "exact_match,none", "acc_norm,none", "word_perplexity,none")


def options(cfg: DictConfig) -> Dict[str, Any]:
    """The run's settings from eval.py's config (root keys tasks, limit, num_fewshot, batch_size, compare_base and
    the harness node's own keys), checked before any model is loaded."""
    harness = cfg.get("harness") or {}
    tasks = cfg.get("tasks")
    if tasks is None or (isinstance(tasks, str) and not tasks.strip()):
        raise FactoryError("harness=lm_eval needs tasks=<lm-eval task names>, e.g. tasks=mmlu, "
                           "tasks=mmlu,hellaswag or tasks=microworld_knowledge (offline).")
    if not isinstance(tasks, str):
        tasks = [str(t) for t in tasks]
    few = cfg.get("num_fewshot")
    if few is not None and (isinstance(few, bool) or not isinstance(few, int) or few < 0):
        raise FactoryError(f"num_fewshot={few!r} must be null (each task's default) or an integer >= 0.")
    compare = cfg.get("compare_base", False)
    if not isinstance(compare, bool):
        raise FactoryError(f"compare_base={compare!r} must be true or false.")
    boot = harness.get("bootstrap_iters", 100000)
    if isinstance(boot, bool) or not isinstance(boot, int) or boot < 0:
        raise FactoryError(f"harness.bootstrap_iters={boot!r} (configs/harness/lm_eval.yaml) must be an integer "
                           ">= 0 (0: no standard errors).")
    return {"tasks": tasks, "limit": cfg.get("limit"), "num_fewshot": few, "batch_size": int(cfg.batch_size),
            "compare_base": compare, "bootstrap_iters": boot, "max_length": harness.get("max_length")}


def load_base_model(checkpoint: Path, device: str, dtype: Any, trust_remote_code: bool):
    """The checkpoint's model before training: its config built as load_checkpoint builds it (same frozen weights,
    same seed for a random init, the same `stage.init_from` import), with no tuner and no trained weight."""
    meta = read_meta(checkpoint)
    cfg = OmegaConf.load(checkpoint / CONFIG_FILE)
    check_remote_code(cfg, checkpoint / CONFIG_FILE, allowed=trust_remote_code)
    cfg.init = "random" if cfg.get("init", "pretrained") == "random" else "pretrained"
    torch.manual_seed(int(meta.get("seed", cfg.get("seed", 0))))
    model = build_base_model(cfg, dtype=dtype)
    if dtype is not None:
        cast_parameters(model, resolve_dtype(dtype))
    return model.to(device).eval()


def task_manager(specs: List[Any]):
    """lm-eval's task index: its built-in tasks (indexing them takes ~15 s) only when a task is not shipped here."""
    from lm_eval.tasks import TaskManager  # the harness loads only when an lm-eval run starts (seconds)

    return TaskManager(include_defaults=any(isinstance(s, str) for s in specs))


def evaluate(model, opts: Dict[str, Any], tasks: Optional[Any] = None) -> Dict[str, Any]:
    """lm_eval.simple_evaluate on `model` (a LlavaModel) with the run's settings; the harness's result dict.
    `tasks`: a TaskManager to reuse (the tuned and the base model read the same index)."""
    import lm_eval  # the harness loads only when an lm-eval run starts (seconds)

    specs = task_specs(opts["tasks"])
    lm = FactoryTextLM(model, batch_size=opts["batch_size"], max_length=opts["max_length"])
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=specs, num_fewshot=opts["num_fewshot"], limit=opts["limit"],
            bootstrap_iters=opts["bootstrap_iters"], log_samples=False, batch_size=opts["batch_size"],
            task_manager=tasks or task_manager(specs))
    except (KeyError, ValueError, FileNotFoundError) as err:  # lm-eval's unknown task / missing data set errors
        raise FactoryError(f"lm-eval could not run tasks {opts['tasks']!r}: {type(err).__name__}: {err}. Check the "
                           "task names (`lm_eval ls tasks` lists them) and that their data sets are available "
                           "(real tasks read them from the Hugging Face hub or its local cache).") from None
    return json.loads(json.dumps(results, default=str))  # plain JSON types (numpy scalars, dtypes → str)


def primary_scores(results: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """{task or group: {metric, value}} for every entry of the harness's results with a known primary metric."""
    scores = {}
    for task, metrics in sorted((results.get("results") or {}).items()):
        metric = next((m for m in PRIMARY_METRICS if isinstance(metrics.get(m), (int, float))), None)
        if metric is not None:
            scores[task] = {"metric": metric.split(",")[0], "value": float(metrics[metric])}
    return scores


def retention_table(base: Dict[str, Any], tuned: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per task: base score, tuned score, retention % = 100 · tuned / base (null when the base scores 0)."""
    base_scores, tuned_scores = primary_scores(base), primary_scores(tuned)
    rows = []
    for task in sorted(set(base_scores) & set(tuned_scores)):
        b, t = base_scores[task]["value"], tuned_scores[task]["value"]
        lower_better = base_scores[task]["metric"].endswith("perplexity")
        retention = None if (t if lower_better else b) == 0 else 100.0 * ((b / t) if lower_better else (t / b))
        rows.append({"task": task, "metric": base_scores[task]["metric"], "base": b, "tuned": t,
                     "retention_pct": retention})
    return rows


def retention_markdown(rows: List[Dict[str, Any]], checkpoint: Path) -> str:
    lines = [f"Text-only retention of {checkpoint} against its base LLM (lm-evaluation-harness)", "",
             "| task | metric | base | tuned | retention % |", "|---|---|---:|---:|---:|"]
    for r in rows:
        kept = "n/a" if r["retention_pct"] is None else f"{r['retention_pct']:.1f}"
        lines.append(f"| {r['task']} | {r['metric']} | {r['base']:.4f} | {r['tuned']:.4f} | {kept} |")
    return "\n".join(lines) + "\n"


def run_settings(cfg: DictConfig, opts: Dict[str, Any], checkpoint: Path) -> Dict[str, Any]:
    """Everything the results depend on (the key of the output folder); batch size changes no score."""
    specs = task_specs(opts["tasks"])
    local = {s["task"]: {f: file_sha256(Path(p)) for f, p in (s["dataset_kwargs"]["data_files"]).items()}
             for s in specs if isinstance(s, dict)}
    return {"harness": "lm_eval", "lm_eval": version("lm_eval"), "model": checkpoint_identity(checkpoint),
            "dtype": str(cfg.dtype), "tasks": [s["task"] if isinstance(s, dict) else s for s in specs],
            "local_task_data": local, "limit": opts["limit"], "num_fewshot": opts["num_fewshot"],
            "compare_base": opts["compare_base"], "max_length": opts["max_length"]}


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return path


@HARNESSES.register("lm_eval")
def run_lm_eval(cfg: DictConfig) -> Dict[str, Any]:
    """The `harness=lm_eval` job of eval.py (see the module docstring); returns the summary eval.py prints."""
    opts = options(cfg)
    checkpoint = Path(str(cfg.checkpoint)).expanduser()
    read_meta(checkpoint)  # a clear message for a folder that is not a checkpoint, before anything is written
    out_dir = keyed_output_dir(output_dir_for(cfg, checkpoint, "lm_eval"), run_settings(cfg, opts, checkpoint))
    summary: Dict[str, Any] = {"harness": "lm_eval", "output_dir": str(out_dir), "results": str(out_dir / RESULTS)}
    done = (out_dir / RESULTS).is_file() and (not opts["compare_base"] or (out_dir / RETENTION_JSON).is_file())
    if done:  # the same checkpoint and settings: the scores are those already written
        print(f"{out_dir} already holds lm-eval results of this checkpoint with these settings; they are reported "
              "again, not recomputed (delete that folder or pass output_dir=<another folder> to run again).",
              file=sys.stderr)
        tuned = json.loads((out_dir / RESULTS).read_text(encoding="utf-8"))
    else:
        trust = remote_code_opt_in(cfg, "eval.py")
        device = pick_device(str(cfg.device))
        dtype = cfg.dtype or (torch.bfloat16 if device.startswith("cuda") else None)
        index = task_manager(task_specs(opts["tasks"]))
        tuned = evaluate(load_checkpoint(checkpoint, device=device, dtype=dtype, trust_remote_code=trust), opts,
                         index)
        write_json(out_dir / RESULTS, tuned)
        if opts["compare_base"]:
            base = evaluate(load_base_model(checkpoint, device, dtype, trust), opts, index)
            write_json(out_dir / BASE_RESULTS, base)
            rows = retention_table(base, tuned)
            write_json(out_dir / RETENTION_JSON, {"checkpoint": str(checkpoint), "rows": rows})
            (out_dir / RETENTION_MD).write_text(retention_markdown(rows, checkpoint), encoding="utf-8")
    summary["scores"] = {task: s["value"] for task, s in primary_scores(tuned).items()}
    if opts["compare_base"]:
        rows = json.loads((out_dir / RETENTION_JSON).read_text(encoding="utf-8"))["rows"]
        summary["retention_pct"] = {r["task"]: r["retention_pct"] for r in rows}
        summary["base_scores"] = {r["task"]: r["base"] for r in rows}
        summary["retention"] = str(out_dir / RETENTION_MD)
    return summary
