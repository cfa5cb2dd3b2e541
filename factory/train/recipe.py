"""`factory.train.run(cfg)`: the training recipe behind `python train.py`, read top to bottom.

distributed setup → the run folder (rank 0 creates and locks it; a folder holding an earlier run is refused unless
resume=true, whose config must match the checkpoints', or overwrite=true; see run_folder.py and resume.py) → data
(a generated data set, the micro-world, is made on first use) → for each stage of the plan: build the model, load
the previous stage's weights, apply the stage's tuning, train (loop.train_stage), save `<run_dir>/<stage>/` → the
after-training evaluation named by `eval.name` (AFTER_TRAINING registry; the micro-world by default) → a summary
dict (train.py prints it as the last stdout line).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from factory import checkpoint as ckpt
from factory.data import LlavaJsonDataset, collate, get_template
from factory.data.llava_json import data_options
from factory.data.prepare import prepare_data
from factory.data.verify import verify_run_data
from factory.distributed import barrier, broadcast_object, init_distributed
from factory.errors import FactoryError
from factory.registry import AFTER_TRAINING
from factory.safe_load import remote_code_requests
from factory.stages import StageSpec, plan_stages
from factory.tuners import apply_tuning
from factory.train.engine import select_dtype
from factory.train.loop import StageContext, train_stage
from factory.train.losses import build_loss
from factory.train.metrics import MetricsFile, WandbLogger
from factory.train.optim import optimizer_choice
from factory.train.resume import (ResumePoint, check_resume_config, describe_changes, find_resume_point,
                                  recover_interrupted_saves)
from factory.train.run_folder import (RunLock, drop_replaced, environment_fault_message, inspect_folder, move_aside,
                                      prepare_folder, refuse_reuse, write_invocation)


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
    optimizer_choice(cfg.trainer.get("optimizer"))  # a typo in the optimizer or loss fails before any work
    build_loss(cfg.trainer)
    dtype = select_dtype(str(cfg.trainer.get("precision", "auto")), dist.device)
    if dist.device.type == "cpu" and cfg.trainer.get("cpu_threads"):
        torch.set_num_threads(int(cfg.trainer.cpu_threads))
    stage1: Optional[Path] = _initial_stage1_checkpoint(cfg, stages)  # checked before the folder is touched
    # rank 0's folder for everyone: a default run_dir holds a timestamp, which ranks started a second apart differ on
    run_dir = Path(broadcast_object(str(Path(str(cfg.run_dir)).expanduser().resolve())))
    opened = open_run_folder(cfg, dist, run_dir, [s.name for s in stages])
    try:
        if opened.nothing_to_do:
            print(opened.nothing_to_do, file=sys.stderr, flush=True)
            return {"run_dir": str(run_dir), "nothing_to_do": True, "message": opened.nothing_to_do}
        summary = _train(cfg, dist, started, run_dir, stages, dtype, opened, stage1)
    except FactoryError:
        raise
    except Exception as err:  # a full or read-only disk surfaces as OSError, or inside torch/safetensors saves
        message = environment_fault_message(err, run_dir)
        if message is None:
            raise
        raise FactoryError(message) from None
    finally:
        if opened.lock is not None:
            opened.lock.release()
    if dist.is_main:
        drop_replaced(opened.replaced)
    return summary


def _train(cfg: DictConfig, dist, started: float, run_dir: Path, stages, dtype, opened: "OpenedRun",
           stage1: Optional[Path]) -> Dict[str, Any]:
    _prepare_data(cfg, dist)
    metrics = MetricsFile(run_dir / "metrics.jsonl")
    resume = opened.resume
    logger = WandbLogger(cfg.get("logger"), run_dir, OmegaConf.to_container(cfg, resolve=True), enabled=dist.is_main)
    ctx = StageContext(cfg=cfg, dist=dist, run_dir=run_dir, dtype=dtype, metrics=metrics, wandb=logger)
    previous: Optional[Path] = stage1
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
            if dist.is_main and opened.resumed_record:
                record_resume(result.checkpoint, opened.resumed_record)
            results[spec.name] = result.summary()
            ctx.step_offset += result.steps
            previous, last_spec = result.checkpoint, spec
        evaluation = evaluate_after_training(cfg, dist, model, previous, last_spec)
    finally:
        logger.finish()

    summary: Dict[str, Any] = {"run_dir": str(run_dir), "stages": results}
    eval_name = (cfg.get("eval") or {}).get("name")
    if eval_name:  # the keys are there (null) when the evaluation did not run, so summaries have one shape
        summary[f"{eval_name}_accuracy"] = evaluation.get("accuracy")
        summary[f"{eval_name}_per_type"] = evaluation.get("per_type")
        for key, value in (evaluation.get("extra") or {}).items():
            summary[f"{eval_name}_{key}"] = value
    summary["wall_s"] = round(time.time() - started, 2)
    if opened.resumed_record:
        summary["resumed"] = opened.resumed_record
    for name, stage in results.items():
        summary[f"{name}_final_loss"] = stage["final_loss"]
    if dist.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@dataclass
class OpenedRun:
    resume: ResumePoint = field(default_factory=ResumePoint)
    resumed_record: Optional[Dict[str, Any]] = None  # resume=true: where it continued, which safe settings changed
    replaced: Optional[Path] = None                  # overwrite=true: where the earlier run's files wait
    nothing_to_do: Optional[str] = None
    lock: Optional[RunLock] = None                   # rank 0 only


def open_run_folder(cfg: DictConfig, dist, run_dir: Path, stage_names) -> OpenedRun:
    """Rank 0 creates and locks the folder, refuses to reuse it silently, checks a resume; the others wait for its
    decision (an error on rank 0 is raised on every rank, so no rank is left waiting in a collective)."""
    lock = RunLock(run_dir) if dist.is_main else None
    outcome: Any = None
    unexpected: Optional[BaseException] = None
    if dist.is_main:
        try:
            outcome = _decide(cfg, run_dir, list(stage_names), lock)
        except Exception as err:
            lock.release()
            message = str(err) if isinstance(err, FactoryError) else environment_fault_message(err, run_dir)
            if message is None:  # a bug, not a user error: the other ranks stop too, rank 0 shows the trace
                unexpected, message = err, f"rank 0 failed while preparing {run_dir}: {type(err).__name__}: {err}"
            outcome = FactoryError(message)
    outcome = broadcast_object(outcome)
    if unexpected is not None:
        raise unexpected
    if isinstance(outcome, FactoryError):
        raise outcome
    outcome.lock = lock
    return outcome


def _decide(cfg: DictConfig, run_dir: Path, stage_names, lock: RunLock) -> OpenedRun:
    resume, overwrite = bool(cfg.get("resume")), bool(cfg.get("overwrite"))
    if resume and overwrite:
        raise FactoryError("resume=true and overwrite=true contradict each other: resume continues the run in "
                           f"{run_dir}, overwrite replaces it. Pass only one of them.")
    prepare_folder(run_dir)
    lock.acquire()
    contents = inspect_folder(run_dir)
    opened = OpenedRun()
    if resume:
        recover_interrupted_saves(run_dir, stage_names)
        opened.resume = point = find_resume_point(cfg, run_dir, stage_names)
        changes = check_resume_config(cfg, run_dir, point)
        if len(point.completed) == len(stage_names) and (run_dir / "summary.json").is_file():
            done = ", ".join(f"{n}: {ckpt.read_meta(run_dir / n)['total_steps']} steps" for n in stage_names)
            opened.nothing_to_do = (
                f"resume=true: nothing to train. Every stage of {run_dir} is already finished ({done}) and its "
                "summary.json is written. A finished stage is not extended (its cosine schedule has ended); to train "
                "more, start a new run_dir (stage 2 can start from this stage 1 with stage=instruct "
                f"stage.init_from={run_dir / 'pretrain'}).")
            return opened
        if point.completed or point.stage:
            changes = {k: v for k, v in changes.items() if k not in ("resume", "run_dir", "overwrite")}
            opened.resumed_record = {"completed": sorted(point.completed), "stage": point.stage, "step": point.step,
                                     "changed": {k: [a, b] for k, (a, b) in changes.items()}}
            where = f"stage {point.stage} at step {point.step}" if point.stage else "after the finished stages"
            print(f"resume=true: continuing {run_dir} ({where})"
                  + (f" with changed settings that do not alter training: {describe_changes(changes)}"
                     if changes else "") + ".", file=sys.stderr, flush=True)
        MetricsFile(run_dir / "metrics.jsonl").truncate_after(point.keeps_record)
    elif contents.holds_run:
        if not overwrite:
            refuse_reuse(run_dir, contents)
        opened.replaced = move_aside(run_dir)
    write_invocation(run_dir, cfg, _hydra_overrides(), resumed=resume and contents.holds_run)
    return opened


def _hydra_overrides():
    """The command-line overrides of this job when train.py runs it under Hydra (None when called directly)."""
    try:
        return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None
    except Exception:
        return None


def record_resume(checkpoint: Optional[Path], record: Dict[str, Any]) -> None:
    """Add the resume record to a checkpoint's meta.json (atomic replace), so it says how it was produced."""
    if checkpoint is None:
        return
    meta_file = Path(checkpoint) / ckpt.META_FILE
    meta = json.loads(meta_file.read_text())
    meta.setdefault("resumes", []).append(record)
    tmp = meta_file.with_name(meta_file.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, meta_file)


def _prepare_data(cfg: DictConfig, dist) -> None:
    """A generated data set (the micro-world) is generated once by rank 0; the other ranks then find it cached."""
    if dist.is_main:
        prepare_data(cfg.data)
    barrier()
    if not dist.is_main:
        prepare_data(cfg.data)


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
    if ckpt.imported_source(init_from):  # hf:<dir> …: the imported model is the start, no stage-1 folder
        return None
    path = Path(str(init_from)).expanduser().resolve()
    ckpt.require_stage1_checkpoint(path)
    return path


def build_stage_model(cfg: DictConfig, spec: StageSpec, stage1: Optional[Path], dtype: torch.dtype):
    """A fresh model for a stage: base weights (seeded, so init=random is reproducible by load_checkpoint),
    then the stage-1 weights when starting stage 2, then this stage's tuning."""
    # Everything random here (base weights for init=random, connector and tuner initialisation) comes from the
    # run's seed, so identical configs give identical models in every process and after a resume.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.get("seed", 0)))
        model = ckpt.build_base_model(cfg, dtype=dtype)  # build_model, or the stage.init_from=hf:<dir> import
        if stage1 is not None:
            meta = ckpt.require_stage1_checkpoint(stage1)
            ckpt.restore_trained_weights(model, stage1, OmegaConf.load(stage1 / ckpt.CONFIG_FILE), meta)
        apply_tuning(model, cfg.tuner, spec.tune)
    model.template = spec.template
    return model


def build_dataset(cfg: DictConfig, spec: StageSpec, model):
    dataset = LlavaJsonDataset(
        json_path=str(spec.data.json), image_folder=str(spec.data.get("image_folder") or ""),
        tokenizer=model.tokenizer, template=get_template(spec.template),
        image_transform=model.vision.image_transform, num_image_tokens=model.image_token_count,
        max_length=int(cfg.trainer.get("max_length", 2048)),
        image_first=cfg.data.get("image_first", True) is not False,
        **data_options(cfg.data),
    )
    if cfg.data.get("verify_images"):
        verify_run_data(cfg, spec, dataset, Path(str(cfg.run_dir)).expanduser().resolve())
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    return dataset, partial(collate, pad_token_id=pad_id, padding_side="right")


def evaluate_after_training(cfg: DictConfig, dist, model, last_checkpoint: Optional[Path], last_spec) -> Dict[str, Any]:
    """The after-training evaluation named by `eval.name` (AFTER_TRAINING registry, configs/eval/*.yaml) on the final
    model: rank 0 evaluates, everyone gets the numbers. Only a stage-2 model is evaluated (a stage-1 model only
    captions). Returns {} when nothing is evaluated."""
    eval_cfg = cfg.get("eval") or {}
    name = eval_cfg.get("name")
    if not name or eval_cfg.get("enabled", True) is False or last_checkpoint is None:
        return {}
    if last_spec is None or last_spec.name != "instruct":
        return {}
    evaluate = AFTER_TRAINING.get(str(name))
    evaluation: Dict[str, Any] = {}
    if dist.is_main:
        if model is None or _is_zero3(cfg):  # ZeRO-3 left the in-memory weights partitioned
            # this run's own checkpoint: remote code is allowed exactly when the run's config allowed it
            model = ckpt.load_checkpoint(last_checkpoint, device=str(dist.device),
                                         trust_remote_code=bool(remote_code_requests(cfg)))
        model.eval()
        evaluation = evaluate(model, cfg) or {}
    return broadcast_object(evaluation)


def _is_zero3(cfg: DictConfig) -> bool:
    return int(((cfg.get("deepspeed") or {}).get("zero_optimization") or {}).get("stage", 0)) == 3
