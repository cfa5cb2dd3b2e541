"""`factory.train.run(cfg)`: the whole run behind `python train.py`.

distributed setup → data (the micro-world is generated on first use) → for each stage of the plan: build the
model, load the previous stage's weights, apply the stage's tuning, train, save `<run_dir>/<stage>/` → micro-world
evaluation → a summary dict (train.py prints it as the last stdout line).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from factory.errors import FactoryError
from factory.train import checkpoint as ckpt
from factory.train.distributed import barrier, broadcast_object, init_distributed
from factory.train.engine import select_dtype
from factory.train.loop import StageContext, train_stage
from factory.train.metrics import MetricsFile, WandbLogger
from factory.train.resume import ResumePoint, find_resume_point, recover_interrupted_saves
from factory.train.stages import StageSpec, plan_stages


def run(cfg: DictConfig) -> Dict[str, Any]:
    started = time.time()
    # The process group lives until the process exits (DeepSpeed caches groups derived from it, so a second
    # run in the same process, e.g. in tests or a notebook, must reuse it rather than re-create it).
    dist = init_distributed()
    return _run(cfg, dist, started)


def _run(cfg: DictConfig, dist, started: float) -> Dict[str, Any]:
    if cfg.get("init") == "meta":
        raise FactoryError("init=meta builds a model without weights (for `--cfg` dry runs and parameter counts); "
                           "training needs init=pretrained (or init=random for smoke tests).")
    stages = plan_stages(cfg)
    dtype = select_dtype(str(cfg.trainer.get("precision", "auto")), dist.device)
    if dist.device.type == "cpu" and cfg.trainer.get("cpu_threads"):
        torch.set_num_threads(int(cfg.trainer.cpu_threads))
    run_dir = Path(str(cfg.run_dir)).expanduser().resolve()
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    _prepare_data(cfg, dist)

    metrics = MetricsFile(run_dir / "metrics.jsonl")
    if cfg.get("resume") and dist.is_main:
        recover_interrupted_saves(run_dir, [s.name for s in stages])
    barrier()
    resume: ResumePoint = find_resume_point(cfg, run_dir, [s.name for s in stages]) if cfg.get("resume") else ResumePoint()
    if dist.is_main:
        if cfg.get("resume"):
            metrics.truncate_after(resume.keeps_record)
        elif metrics.path.exists():
            metrics.path.unlink()  # a fresh run in an existing folder starts a fresh log
    barrier()

    logger = WandbLogger(cfg.get("logger"), run_dir, OmegaConf.to_container(cfg, resolve=True), enabled=dist.is_main)
    ctx = StageContext(cfg=cfg, dist=dist, run_dir=run_dir, dtype=dtype, metrics=metrics, wandb=logger)
    previous: Optional[Path] = _initial_stage1_checkpoint(cfg, stages)
    results, model, last_spec = {}, None, None
    try:
        for spec in stages:
            if spec.name in resume.completed:
                previous = run_dir / spec.name
                ctx.step_offset += int(ckpt.read_meta(previous)["total_steps"])
                continue
            model = build_stage_model(cfg, spec, previous if spec.name == "instruct" else None, dtype)
            dataset, collate_fn = build_dataset(cfg, spec, model)
            resume_from = run_dir / spec.name if resume.stage == spec.name else None
            result = train_stage(model, spec, dataset, collate_fn, ctx, resume_from=resume_from)
            results[spec.name] = result.summary()
            ctx.step_offset += result.steps
            previous, last_spec = result.checkpoint, spec
        evaluation = _evaluate(cfg, dist, model, previous, last_spec)
    finally:
        logger.finish()

    summary = {"run_dir": str(run_dir), "stages": results,
               "microworld_accuracy": evaluation.get("accuracy"), "microworld_per_type": evaluation.get("per_type"),
               "wall_s": round(time.time() - started, 2)}
    for name, stage in results.items():
        summary[f"{name}_final_loss"] = stage["final_loss"]
    if dist.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _prepare_data(cfg: DictConfig, dist) -> None:
    """Generate the micro-world once (rank 0), then let the other ranks find it cached."""
    if cfg.data.get("name") != "microworld":
        return
    from factory.data.microworld import ensure_microworld

    if dist.is_main:
        ensure_microworld(cfg.data)
    barrier()
    if not dist.is_main:
        ensure_microworld(cfg.data)


def _initial_stage1_checkpoint(cfg: DictConfig, stages) -> Optional[Path]:
    """When the run starts at stage 2, `stage.init_from` must name a finished stage-1 checkpoint."""
    if stages[0].name != "instruct":
        return None
    init_from = cfg.stage.get("init_from")
    if not init_from:
        raise FactoryError(
            "stage=instruct starts from a stage-1 checkpoint, but `stage.init_from` is not set. Pass "
            "stage.init_from=<run_dir>/pretrain (the folder a stage=pretrain run wrote), or use stage=all."
        )
    path = Path(str(init_from)).expanduser().resolve()
    ckpt.require_stage1_checkpoint(path)
    return path


def build_stage_model(cfg: DictConfig, spec: StageSpec, stage1: Optional[Path], dtype: torch.dtype):
    """A fresh model for a stage: base weights (seeded, so init=random is reproducible by load_checkpoint),
    then the stage-1 weights when starting stage 2, then this stage's tuning."""
    from factory.model.build import build_model
    from factory.tuners import apply_tuning

    # Everything random here (base weights for init=random, connector and tuner initialisation) comes from the
    # run's seed, so identical configs give identical models in every process and after a resume.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.get("seed", 0)))
        model = build_model(cfg, dtype=dtype)
        if stage1 is not None:
            meta = ckpt.require_stage1_checkpoint(stage1)
            ckpt.restore_trained_weights(model, stage1, OmegaConf.load(stage1 / ckpt.CONFIG_FILE), meta)
        apply_tuning(model, cfg.tuner, spec.tune)
    model.template = spec.template
    return model


def build_dataset(cfg: DictConfig, spec: StageSpec, model):
    from functools import partial

    from factory.data import LlavaJsonDataset, collate, get_template

    dataset = LlavaJsonDataset(
        json_path=str(spec.data.json), image_folder=str(spec.data.get("image_folder") or ""),
        tokenizer=model.tokenizer, template=get_template(spec.template),
        image_transform=model.vision.image_transform, num_image_tokens=model.image_token_count,
        max_length=int(cfg.trainer.get("max_length", 2048)),
    )
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    return dataset, partial(collate, pad_token_id=pad_id, padding_side="right")


def _evaluate(cfg: DictConfig, dist, model, last_checkpoint: Optional[Path], last_spec) -> Dict[str, Any]:
    """Held-out micro-world accuracy of the final model (rank 0 evaluates, everyone gets the numbers)."""
    eval_cfg = cfg.get("eval") or {}
    if cfg.data.get("name") != "microworld" or last_checkpoint is None or eval_cfg.get("enabled", True) is False:
        return {}
    if last_spec is None or last_spec.name != "instruct":
        return {}  # a stage-1 model only captions; the question/answer split measures stage 2
    evaluation = {}
    if dist.is_main:
        from factory.eval.microworld import evaluate_microworld, format_table

        if model is None or _is_zero3(cfg):  # ZeRO-3 left the in-memory weights partitioned
            from factory.safe_load import remote_code_requests

            # this run's own checkpoint: remote code is allowed exactly when the run's config allowed it
            model = ckpt.load_checkpoint(last_checkpoint, device=str(dist.device),
                                         trust_remote_code=bool(remote_code_requests(cfg)))
        model.eval()
        result = evaluate_microworld(model, cfg.data.eval.json, cfg.data.eval.image_folder,
                                     **_eval_kwargs(eval_cfg))
        print(format_table(result), file=sys.stderr, flush=True)
        evaluation = {"accuracy": float(result["accuracy"]), "per_type": result.get("per_type")}
    return broadcast_object(evaluation)


def _is_zero3(cfg: DictConfig) -> bool:
    return int(((cfg.get("deepspeed") or {}).get("zero_optimization") or {}).get("stage", 0)) == 3


def _eval_kwargs(eval_cfg) -> Dict[str, Any]:
    allowed = ("batch_size", "max_new_tokens", "limit")
    return {k: eval_cfg[k] for k in allowed if k in eval_cfg and eval_cfg[k] is not None}
