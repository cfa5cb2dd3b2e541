"""The training loop of one stage, on a DeepSpeed engine (also for a single process).

`train_stage` reads top to bottom, torchtune-style: `setup` (seeds, batch plan, engine with the configured optimizer
and the cosine schedule, optional resume, loader) → `train_step` per optimizer step (its micro-batches forward and
backward, one optimizer step) → `log_step` → `save` (every trainer.save_every steps, and at the end) → `cleanup`.

Loss normalisation: every optimizer step averages the configured loss (trainer.loss, label-token cross-entropy by
default) over ALL its targets in the global batch (all micro-batches on all ranks), not the mean of per-micro-batch
means. That makes 2 × micro-batch 4 identical to
1 × micro-batch 8 and 2 processes identical to 1 process with accumulation, up to float summation order.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

import factory
from factory import checkpoint as ckpt
from factory.distributed import DistInfo, all_reduce_sum
from factory.errors import FactoryError
from factory.stages import StageSpec, gradient_accumulation
from factory.train.engine import create_engine, deepspeed_config
from factory.train.losses import build_loss
from factory.train.sampler import BatchPlan, GlobalBatchSampler


@dataclass
class StageContext:
    """What a stage needs from the run around it."""
    cfg: Any
    dist: DistInfo
    run_dir: Path
    dtype: torch.dtype
    metrics: Any          # MetricsFile (rank 0 writes)
    wandb: Any            # WandbLogger
    step_offset: int = 0  # optimizer steps of earlier stages (wandb needs one monotonic step axis)

    @property
    def save_every(self) -> int:  # mid-stage checkpoints every N optimizer steps (0: only the final one)
        return int(self.cfg.trainer.get("save_every") or 0)

    @property
    def log_every(self) -> int:  # wandb; metrics.jsonl gets every step
        return max(1, int(self.cfg.trainer.get("log_every") or 1))


@dataclass
class StageResult:
    name: str
    steps: int
    losses: List[float] = field(default_factory=list)
    wall_s: float = 0.0
    checkpoint: Optional[Path] = None
    bad_samples: int = 0  # samples skipped as bad (data.on_bad_sample=skip), all ranks, each meeting counted

    def summary(self) -> Dict[str, Any]:
        return {"steps": self.steps, "first_loss": self.losses[0] if self.losses else None,
                "final_loss": self.losses[-1] if self.losses else None, "wall_s": round(self.wall_s, 2),
                "checkpoint": str(self.checkpoint) if self.checkpoint else None, "bad_samples": self.bad_samples}


def _to_device(batch: Dict[str, Any], device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
    out = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "labels", "attention_mask")}
    pixels = batch.get("pixel_values")
    out["pixel_values"] = pixels.to(device, dtype=dtype, non_blocking=True) if pixels is not None else None
    return out


def stage_meta(spec: StageSpec, cfg: Any, model: Any, plan: BatchPlan, step: int, total_steps: int,
               bad_samples: int = 0) -> Dict[str, Any]:
    return {
        "stage": spec.name, "template": spec.template, "tune": spec.tune,
        "tuner": cfg.tuner.get("name") if spec.tune.get("llm") == "tuner" else None,
        "vision_path": cfg.vision.get("path"), "llm_path": cfg.llm.get("path"),
        "image_token_count": int(model.image_token_count), "factory_version": factory.__version__,
        "init": cfg.get("init"), "seed": int(cfg.get("seed", 0)),
        "step": step, "total_steps": total_steps, "complete": step >= total_steps,
        "steps_per_epoch": plan.steps_per_epoch, "num_samples": plan.num_samples,
        "global_batch_size": plan.global_batch_size, "bad_samples": bad_samples,
        # how prompts were built (<image> moved first or kept in place): config.yaml holds data.image_first only
        # when the data config names it, while training then uses its default (true), so the fact is recorded here
        "image_first": (cfg.get("data") or {}).get("image_first", True) is not False,
    }


@dataclass
class StageRun:
    """Everything one stage's steps share, made by `setup`."""
    model: torch.nn.Module
    spec: StageSpec
    ctx: StageContext
    engine: Any
    scheduler: Any
    loss: Any                 # trainer.loss: count(batch) and sum(logits, labels) (factory/train/losses.py)
    plan: BatchPlan
    total_steps: int
    start_step: int
    batches: Any              # iterator over this rank's micro-batches
    result: StageResult
    progress: Any


def train_stage(model: torch.nn.Module, spec: StageSpec, dataset, collate_fn: Callable, ctx: StageContext,
                resume_from: Optional[Path] = None) -> StageResult:
    """One stage: setup → one optimizer step after another (with periodic saves) → the final save → cleanup."""
    started = time.time()
    run = setup(model, spec, dataset, collate_fn, ctx, resume_from)
    for step in range(run.start_step, run.total_steps):
        log_step(run, step, train_step(run, step))
        if run.ctx.save_every and (step + 1) % run.ctx.save_every == 0 and step + 1 < run.total_steps:
            save(run, step + 1, with_engine_state=True)
    run.progress.close()
    # A finished stage is never resumed from (resume skips complete stages), so its checkpoint holds no optimizer
    # state: for full fine-tuning that state is ~16 bytes per parameter, the bulk of every mid-stage save.
    run.result.checkpoint = save(run, run.total_steps, with_engine_state=False)
    cleanup(run)
    run.result.wall_s = time.time() - started
    return run.result


def setup(model: torch.nn.Module, spec: StageSpec, dataset, collate_fn: Callable, ctx: StageContext,
          resume_from: Optional[Path]) -> StageRun:
    """Seeds, the batch plan, the engine (configured optimizer + cosine schedule), the resume state, the loader."""
    cfg, dist, trainer, hp = ctx.cfg, ctx.dist, ctx.cfg.trainer, spec.hparams
    # Dropout etc. draw from the global RNGs. Seeding per stage (and rank) makes a stage's randomness independent of
    # whether the previous stage ran in this process, which exact resume needs.
    seed_everything(int(cfg.get("seed", 0)) + 1000 * dist.rank)
    plan, total_steps = plan_batches(spec, dataset, trainer, dist.world_size)
    if trainer.get("gradient_checkpointing"):
        model.activation_checkpointing_enable()
    if not any(p.requires_grad for p in model.parameters()):
        raise FactoryError(f"Nothing trains in stage {spec.name!r}: `stage.{spec.name}.tune` freezes every component.")
    ds_config = deepspeed_config(cfg.get("deepspeed"), plan.micro_batch_size, plan.grad_accum, dist.world_size,
                                 trainer.get("max_grad_norm", 1.0), ctx.dtype)
    engine, scheduler = create_engine(model, hp, ds_config, total_steps, trainer.get("optimizer"))
    start_step, bad_samples = resume_engine(engine, resume_from, plan, dist.rank)
    # this rank's micro-batches, grad_accum per optimizer step, from start_step on
    sampler = GlobalBatchSampler(plan, rank=dist.rank, seed=int(cfg.get("seed", 0)), total_steps=total_steps,
                                 start_step=start_step)
    # Its own generator: creating a DataLoader iterator draws a worker seed, which must not shift the global RNG
    # (dropout masks) between an uninterrupted run and a resumed one.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                                         num_workers=int(trainer.get("num_workers", 0) or 0),
                                         generator=torch.Generator().manual_seed(int(cfg.get("seed", 0))))
    run = StageRun(model=model, spec=spec, ctx=ctx, engine=engine, scheduler=scheduler,
                   loss=build_loss(trainer), plan=plan, total_steps=total_steps, start_step=start_step,
                   batches=iter(loader), result=StageResult(name=spec.name, steps=total_steps, bad_samples=bad_samples),
                   progress=_progress_bar(dist.is_main, spec.name, total_steps, start_step))
    engine.train()
    return run


def plan_batches(spec: StageSpec, dataset, trainer: Any, world_size: int):
    """How many samples, micro-batches and optimizer steps (trainer.max_steps caps the steps)."""
    hp = spec.hparams
    if len(dataset) == 0:
        raise FactoryError(
            f"The {spec.name} dataset {spec.data.json} has no usable samples (empty, or every sample was skipped; "
            "see the warnings above). Point `data." + spec.name + ".json` at a LLaVA JSON file with samples."
        )
    micro = int(hp.micro_batch_size)
    accum = gradient_accumulation(spec.name, int(hp.global_batch_size), micro, world_size)
    plan = BatchPlan(num_samples=len(dataset), micro_batch_size=micro, grad_accum=accum, world_size=world_size)
    total_steps = max(1, math.ceil(float(hp.epochs) * plan.steps_per_epoch))
    if trainer.get("max_steps"):
        total_steps = min(total_steps, int(trainer.max_steps))
    return plan, total_steps


def resume_engine(engine, resume_from: Optional[Path], plan: BatchPlan, rank: int):
    """(first step, bad samples so far): (0, 0) for a fresh stage, else the mid-stage checkpoint's, its optimizer,
    scheduler, weights and RNG loaded into the engine."""
    if resume_from is None:
        return 0, 0
    meta = ckpt.read_meta(resume_from)
    if (meta.get("num_samples"), meta.get("global_batch_size")) != (plan.num_samples, plan.global_batch_size):
        raise FactoryError(
            f"Cannot resume {resume_from}: it was written for {meta.get('num_samples')} samples with global batch "
            f"{meta.get('global_batch_size')}, this run has {plan.num_samples} and {plan.global_batch_size}. "
            "Resume with the same data and trainer settings, or start a new run_dir."
        )
    ckpt.load_engine_state(engine, resume_from, rank)
    return int(meta["step"]), int(meta.get("bad_samples", 0))


def train_step(run: StageRun, step: int) -> Dict[str, Any]:
    """One optimizer step over grad_accum micro-batches; returns its metrics record."""
    dist, engine, t0 = run.ctx.dist, run.engine, time.time()
    micro_batches = [_next_batch(run.batches) for _ in range(run.plan.grad_accum)]
    counts = torch.tensor([sum(run.loss.count(b) for b in micro_batches),
                           sum(int(b["attention_mask"].sum()) for b in micro_batches),
                           sum(len(b.get("bad_samples") or ()) for b in micro_batches)],
                          dtype=torch.float64, device=dist.device)
    targets, seen_tokens, bad_samples = all_reduce_sum(counts).tolist()
    run.result.bad_samples += int(bad_samples)
    # DeepSpeed averages gradients over ranks; scaling by world/targets makes the result the global mean
    scale = dist.world_size / max(targets, 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
    lr = run.scheduler.get_last_lr()[0]
    for batch in micro_batches:
        batch = _to_device(batch, dist.device, run.ctx.dtype)
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"])
        summed = run.loss.sum(out.logits, batch["labels"])
        engine.backward(summed * scale, scale_wrt_gas=False)
        engine.step()  # DeepSpeed steps the optimizer and scheduler at the accumulation boundary only
        loss_sum += summed.detach().double()
    loss = float(all_reduce_sum(loss_sum)) / max(targets, 1.0)
    elapsed = max(time.time() - t0, 1e-9)
    record = {"stage": run.spec.name, "step": step + 1, "epoch": round((step + 1) / run.plan.steps_per_epoch, 4),
              "loss": loss, "lr": lr, "samples_per_s": run.plan.global_batch_size / elapsed,
              "tokens_per_s": seen_tokens / elapsed, "bad_samples": run.result.bad_samples}
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    return record


def log_step(run: StageRun, step: int, record: Dict[str, Any]) -> None:
    """metrics.jsonl gets every step, wandb every trainer.log_every-th and the last; the progress bar moves."""
    run.result.losses.append(record["loss"])
    if not run.ctx.dist.is_main:
        return
    run.ctx.metrics.write(record)
    if (step + 1) % run.ctx.log_every == 0 or step + 1 == run.total_steps:
        run.ctx.wandb.log(record, step=run.ctx.step_offset + step + 1)
    run.progress.update(1)
    run.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             samples_per_s=f"{record['samples_per_s']:.1f}")


def save(run: StageRun, step: int, with_engine_state: bool) -> Path:
    """`<run_dir>/<stage>/` at `step` (a mid-stage checkpoint says `"complete": false`), from every rank."""
    meta = stage_meta(run.spec, run.ctx.cfg, run.model, run.plan, step, run.total_steps, run.result.bad_samples)
    return ckpt.save_stage_checkpoint(run.engine, run.ctx.cfg, run.ctx.run_dir / run.spec.name, meta,
                                      run.ctx.dist.rank, with_engine_state=with_engine_state)


def cleanup(run: StageRun) -> None:
    run.engine.destroy()  # drop DeepSpeed's gradient hooks: the next stage builds its own engine


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _next_batch(batches):
    """A DataLoader worker re-raises our FactoryError with its whole traceback in the message; keep the message."""
    try:
        return next(batches)
    except FactoryError as err:
        text = str(err)
        marker = "FactoryError: "
        if text.startswith("Caught FactoryError") and marker in text:
            raise FactoryError(text.rsplit(marker, 1)[1].strip()) from None
        raise


def _progress_bar(enabled: bool, stage: str, total: int, initial: int):
    return tqdm(total=total, initial=initial, desc=stage, disable=not enabled, dynamic_ncols=True)
