"""The training loop of one stage, on a DeepSpeed engine (also for a single process).

Read top to bottom: batch plan → engine (AdamW + cosine, DeepSpeed config) → optional resume → for each optimizer
step: fetch its micro-batches, forward/backward each, one optimizer step, log → save the stage checkpoint.

Loss normalisation: every optimizer step averages the cross-entropy over ALL label tokens of its global batch (all
micro-batches on all ranks), not the mean of per-micro-batch means. That makes 2 × micro-batch 4 identical to
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
from factory.constants import IGNORE_INDEX
from factory.errors import FactoryError
from factory.model.llava import token_loss_sum
from factory.distributed import DistInfo, all_reduce_sum
from factory.train.engine import create_engine, deepspeed_config
from factory.train.sampler import BatchPlan, GlobalBatchSampler
from factory.stages import StageSpec, gradient_accumulation


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


def count_label_tokens(batch: Dict[str, Any]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


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


def train_stage(model: torch.nn.Module, spec: StageSpec, dataset, collate_fn: Callable, ctx: StageContext,
                resume_from: Optional[Path] = None) -> StageResult:
    cfg, dist, trainer, hp = ctx.cfg, ctx.dist, ctx.cfg.trainer, spec.hparams
    started = time.time()
    # Dropout etc. draw from the global RNGs. Seeding per stage (and rank) makes a stage's randomness independent of
    # whether the previous stage ran in this process, which exact resume needs.
    seed_everything(int(cfg.get("seed", 0)) + 1000 * dist.rank)

    # ---- how many samples, micro-batches and optimizer steps
    if len(dataset) == 0:
        raise FactoryError(
            f"The {spec.name} dataset {spec.data.json} has no usable samples (empty, or every sample was skipped; "
            "see the warnings above). Point `data." + spec.name + ".json` at a LLaVA JSON file with samples."
        )
    micro = int(hp.micro_batch_size)
    accum = gradient_accumulation(spec.name, int(hp.global_batch_size), micro, dist.world_size)
    plan = BatchPlan(num_samples=len(dataset), micro_batch_size=micro, grad_accum=accum, world_size=dist.world_size)
    total_steps = max(1, math.ceil(float(hp.epochs) * plan.steps_per_epoch))
    if trainer.get("max_steps"):
        total_steps = min(total_steps, int(trainer.max_steps))

    # ---- engine: client AdamW + cosine schedule, DeepSpeed config filled from the trainer config
    if trainer.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not any(p.requires_grad for p in model.parameters()):
        raise FactoryError(f"Nothing trains in stage {spec.name!r}: `stage.{spec.name}.tune` freezes every component.")
    ds_config = deepspeed_config(cfg.get("deepspeed"), micro, accum, dist.world_size,
                                 trainer.get("max_grad_norm", 1.0), ctx.dtype)
    engine, scheduler = create_engine(model, hp, ds_config, total_steps)

    start_step, result_bad = 0, 0
    if resume_from is not None:
        meta = ckpt.read_meta(resume_from)
        if (meta.get("num_samples"), meta.get("global_batch_size")) != (plan.num_samples, plan.global_batch_size):
            raise FactoryError(
                f"Cannot resume {resume_from}: it was written for {meta.get('num_samples')} samples with global batch "
                f"{meta.get('global_batch_size')}, this run has {plan.num_samples} and {plan.global_batch_size}. "
                "Resume with the same data and trainer settings, or start a new run_dir."
            )
        ckpt.load_engine_state(engine, resume_from, dist.rank)
        start_step = int(meta["step"])
        result_bad = int(meta.get("bad_samples", 0))

    # ---- data: this rank's micro-batches, grad_accum per optimizer step, from start_step on
    sampler = GlobalBatchSampler(plan, rank=dist.rank, seed=int(cfg.get("seed", 0)), total_steps=total_steps,
                                 start_step=start_step)
    # Its own generator: creating a DataLoader iterator draws a worker seed, which must not shift the global RNG
    # (dropout masks) between an uninterrupted run and a resumed one.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                                         num_workers=int(trainer.get("num_workers", 0) or 0),
                                         generator=torch.Generator().manual_seed(int(cfg.get("seed", 0))))
    batches = iter(loader)
    stage_dir = ctx.run_dir / spec.name
    save_every = int(trainer.get("save_every") or 0)
    keep_engine_state = bool(save_every or cfg.get("resume"))
    log_every = max(1, int(trainer.get("log_every") or 1))  # wandb; metrics.jsonl gets every step
    result = StageResult(name=spec.name, steps=total_steps, bad_samples=result_bad)

    progress = _progress_bar(dist.is_main, spec.name, total_steps, start_step)
    engine.train()
    for step in range(start_step, total_steps):
        t0 = time.time()
        micro_batches = [_next_batch(batches) for _ in range(accum)]
        counts = torch.tensor([sum(count_label_tokens(b) for b in micro_batches),
                               sum(int(b["attention_mask"].sum()) for b in micro_batches),
                               sum(len(b.get("bad_samples") or ()) for b in micro_batches)],
                              dtype=torch.float64, device=dist.device)
        label_tokens, seen_tokens, bad_samples = all_reduce_sum(counts).tolist()
        result.bad_samples += int(bad_samples)
        # DeepSpeed averages gradients over ranks; scaling by world/label_tokens makes the result the global mean
        scale = dist.world_size / max(label_tokens, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
        lr = scheduler.get_last_lr()[0]
        for batch in micro_batches:
            batch = _to_device(batch, dist.device, ctx.dtype)
            out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"])
            summed = token_loss_sum(out.logits, batch["labels"])
            engine.backward(summed * scale, scale_wrt_gas=False)
            engine.step()  # DeepSpeed steps the optimizer and scheduler at the accumulation boundary only
            loss_sum += summed.detach().double()
        loss = float(all_reduce_sum(loss_sum)) / max(label_tokens, 1.0)
        elapsed = max(time.time() - t0, 1e-9)

        record = {"stage": spec.name, "step": step + 1, "epoch": round((step + 1) / plan.steps_per_epoch, 4),
                  "loss": loss, "lr": lr, "samples_per_s": plan.global_batch_size / elapsed,
                  "tokens_per_s": seen_tokens / elapsed, "bad_samples": result.bad_samples}
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        result.losses.append(loss)
        if dist.is_main:
            ctx.metrics.write(record)
            if (step + 1) % log_every == 0 or step + 1 == total_steps:
                ctx.wandb.log(record, step=ctx.step_offset + step + 1)
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_per_s=f"{record['samples_per_s']:.1f}")
        if save_every and (step + 1) % save_every == 0 and step + 1 < total_steps:
            meta = stage_meta(spec, cfg, model, plan, step + 1, total_steps, result.bad_samples)
            ckpt.save_stage_checkpoint(engine, cfg, stage_dir, meta, dist.rank, with_engine_state=True)
    progress.close()

    result.checkpoint = ckpt.save_stage_checkpoint(
        engine, cfg, stage_dir, stage_meta(spec, cfg, model, plan, total_steps, total_steps, result.bad_samples),
        dist.rank, with_engine_state=keep_engine_state)
    engine.destroy()  # drop DeepSpeed's gradient hooks: the next stage builds its own engine
    result.wall_s = time.time() - started
    return result


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
