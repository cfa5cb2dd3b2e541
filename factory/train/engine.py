"""The DeepSpeed engine of a stage: precision choice, the DeepSpeed config (cfg.deepspeed with the batch sizes,
clipping and bf16 filled in from the trainer config) and `deepspeed.initialize` with our client optimizer."""
from __future__ import annotations

from typing import Any, Dict

import deepspeed
import torch
from omegaconf import OmegaConf

from factory.constants import PRECISIONS
from factory.errors import FactoryError
from factory.safe_checkpoint_engine import install_safe_checkpoint_engine
from factory.train.optim import build_optimizer, cosine_with_warmup

def select_dtype(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPU, fp32 on CPU (bf16 matmuls are 5-10x slower than fp32 on CPUs without AMX)."""
    if precision not in PRECISIONS:
        raise FactoryError(f"`trainer.precision` is {precision!r}; use one of {list(PRECISIONS)}.")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def deepspeed_config(ds_cfg: Any, micro_batch_size: int, grad_accum: int, world_size: int,
                     max_grad_norm: float, dtype: torch.dtype) -> Dict[str, Any]:
    config = OmegaConf.to_container(ds_cfg, resolve=True) if ds_cfg is not None else {}
    config = dict(config or {})
    config.pop("name", None)
    config.update({
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": float(max_grad_norm or 0.0),
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        # our AdamW is a torch optimizer, which DeepSpeed calls "untested" under ZeRO; it is what we test with
        "zero_allow_untested_optimizer": True,
    })
    config.setdefault("steps_per_print", 10 ** 9)  # we log ourselves (metrics.jsonl, tqdm, wandb)
    config.setdefault("wall_clock_breakdown", False)
    return config


def _standard_strides(model: torch.nn.Module) -> None:
    """DeepSpeed broadcasts every parameter as `p.data.view(torch.uint8)`, which needs a unit last stride. A
    [D, 1] tensor made by transposing [1, D] (e.g. an orthogonal init through QR) counts as contiguous yet has
    stride (1, D); give such parameters standard strides (same values, same Parameter object)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() and param.stride(-1) != 1:
                param.data = torch.empty(param.shape, dtype=param.dtype, device=param.device).copy_(param.data)


def create_engine(model: torch.nn.Module, hparams: Any, ds_config: Dict[str, Any], total_steps: int,
                  optimizer_cfg: Any = None):
    """`deepspeed.initialize` with the configured optimizer (trainer.optimizer) over the trainable parameters and the
    cosine schedule; the engine reads its resume state with weights_only loads."""
    _standard_strides(model)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, lr=float(hparams.lr), weight_decay=float(hparams.get("weight_decay", 0.0)),
                                optimizer_cfg=optimizer_cfg)
    scheduler = cosine_with_warmup(optimizer, total_steps, float(hparams.get("warmup_ratio", 0.0)))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    # Resume state is read with weights_only loads (a crafted file in a run folder must not run code).
    install_safe_checkpoint_engine(engine)
    return engine, scheduler
