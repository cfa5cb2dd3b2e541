#!/usr/bin/env python
"""Throughput of one stage-2 (instruct) optimizer step per tuner, side by side with the Hugging Face baseline.

    python scripts/bench_throughput.py --model llava_3b --tuners frozen,mores,lora,full --batch 8 --seq 800
    python scripts/bench_throughput.py --size tiny --device cpu --steps 2 --warmup 1      # CI smoke test

Each variant builds the architecture with random weights (`init=random`, from factory/model/arch/*.json, nothing
is downloaded), applies the stage-2 tuning of the tuner (vision frozen, connector full, LLM per tuner), then runs
`--warmup` untimed and `--steps` timed optimizer steps (forward with labels, backward, AdamW step, zero_grad) on a
fixed random batch of `--batch` samples × `--seq` tokens of which the first image's tokens are the encoder's.
The baseline is what a user would pick instead: transformers' `LlavaForConditionalGeneration` built from the same
vision/LLM configs (+ PEFT LoRA with the same r/alpha/targets as our `lora` tuner), in the same plain loop, same
batch, same precision, measured in the same run. Its samples/s is reported as a ratio:
frozen→HF frozen, full→HF full, lora→HF LoRA and, since PEFT has no MoReS, mores→HF LoRA (the PEFT method a user
would train instead). Both sides are pure bf16 on CUDA (weights, grads and AdamW states; fused AdamW) and fp32 on CPU.

MFU = necessary FLOPs per step / step time / peak. Necessary FLOPs (T = batch·seq LLM tokens, T_v = batch·N image
tokens, N_* = weights of the nn.Linear/Conv layers of that part, L/D = layers/hidden size):
  * vision tower, frozen and nothing below it trains: forward only      2·N_vision·T_v + 4·L_v·T_v·N·D_v
  * connector (trained):                                                 6·N_connector·T_v
  * LLM weights that train (full, LoRA A/B):                             6·N_trained·T
  * LLM weights that stay frozen (they still pass gradients down to the connector, but need no weight
    gradient): forward + input gradient                                 4·N_frozen·T   (lm_head included)
  * LLM attention scores and values, forward + backward:                12·L·T·seq·D
MoReS' own layers (its R and W are nn.Linear modules) act on 9 image positions per sample only (< 0.01 % of the
FLOPs): they are left out of N.
Peak: 989 TFLOP/s (H100 SXM dense bf16). On CPU MFU is printed as n/a.

Prints a markdown table and writes JSON (`--json`, default bench_throughput.json).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

import torch  # noqa: E402

from factory.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from factory.errors import FactoryError  # noqa: E402
from factory.model.llava import enable_activation_checkpointing  # noqa: E402

PEAK_FLOPS = {"cuda": 989e12}  # H100 SXM dense bf16; other GPUs: pass --peak-tflops
HF_COUNTERPART = {"frozen": "frozen", "full": "full", "lora": "lora", "mores": "lora"}


# ----------------------------------------------------------------------------------------------------------- build
def compose_config(model: str, tuner: str, size: str, overrides: list[str]):
    """The resolved config of `train.py model=<model> tuner=<tuner> init=random`; at size tiny the same model
    family (llava_3b: SigLIP + Phi, llava_7b/13b: CLIP + Llama) at test size (hidden 64, 2 layers, vocab 512)."""
    from omegaconf import OmegaConf

    from factory.config import compose

    if size == "tiny":
        from factory.testing import tiny_config

        family = {"llm": "phi", "vision": "hf_siglip"} if model == "llava_3b" else {"llm": "llama", "vision": "hf_clip"}
        cfg = compose([f"tuner={tuner}", *overrides])
        OmegaConf.set_struct(cfg, False)  # tiny_config adds arch_overrides, which the YAML schema does not list
        return OmegaConf.merge(cfg, tiny_config(**family))
    if not any(o.lstrip("+").startswith("llm.tokenizer=") for o in overrides):
        # The batch is random token ids: the tokenizer is never used, but init=random still loads one, and the
        # preset's hub tokenizer is not reachable offline (the GPU machine has no network). A small local one.
        from factory.testing import tiny_tokenizer_dir

        overrides = [f"llm.tokenizer={tiny_tokenizer_dir()}", *overrides]
    return compose([f"model={model}", f"tuner={tuner}", "init=random", *overrides])


@contextlib.contextmanager
def built_on(device: str, dtype: torch.dtype):
    """Create parameters directly on the device in the target dtype: a 13B model is never materialised in fp32
    on the host, and random init runs on the GPU."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_ours(cfg, dtype: torch.dtype, device: str):
    """Our LlavaModel with the stage-2 tuning of cfg.tuner applied."""
    from factory.model import build_model
    from factory.tuners import apply_tuning

    with built_on(device, dtype):
        model = build_model(cfg, dtype=dtype)
        apply_tuning(model, cfg.tuner, cfg.stage.instruct.tune)
    return model.to(device=device, dtype=dtype)


def _hf_config_of(module: torch.nn.Module):
    """The first transformers config found on a module or its children (our encoders wrap HF vision models)."""
    from transformers import PretrainedConfig

    for sub in module.modules():
        if isinstance(getattr(sub, "config", None), PretrainedConfig):
            return sub.config
    raise FactoryError(f"No transformers config found inside {type(module).__name__}; the HF baseline needs one.")


def build_hf(vision_cfg, text_cfg, n_image_tokens: int, tuner: str, lora_cfg, dtype, device):
    """transformers' LlavaForConditionalGeneration from the same configs, tuned like stage 2 of `tuner`."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    has_cls = vision_cfg.model_type.startswith("clip")  # CLIP prepends a CLS token that LLaVA drops; SigLIP has none
    config = LlavaConfig(
        vision_config=vision_cfg.to_dict(), text_config=text_cfg.to_dict(), image_token_index=text_cfg.vocab_size - 1,
        image_seq_length=n_image_tokens, vision_feature_select_strategy="default" if has_cls else "full",
        vision_feature_layer=-2,
    )
    config._attn_implementation = "sdpa"
    with built_on(device, dtype):
        model = LlavaForConditionalGeneration(config)
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if tuner == "full":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    elif tuner == "lora":
        from peft import LoraConfig, get_peft_model

        targets = lora_cfg.get("target_modules") or "all-linear"  # null = every LLM linear but lm_head, as ours
        peft_cfg = LoraConfig(r=int(lora_cfg.get("r", 128)), lora_alpha=int(lora_cfg.get("alpha", 256)),
                              lora_dropout=float(lora_cfg.get("dropout", 0.0)),
                              target_modules=list(targets) if not isinstance(targets, str) else targets)
        with built_on(device, dtype):
            model.model.language_model = get_peft_model(model.model.language_model, peft_cfg)
    return model.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------- batch
def make_batch(batch: int, seq: int, n_image: int, image_size: int, vocab: int, device: str, dtype: torch.dtype,
               seed: int = 0):
    """One text token, the image's N placeholders, then text; labels on the text after the image."""
    if seq < n_image + 2:
        raise FactoryError(f"--seq {seq} is shorter than the {n_image} image tokens + 2 text tokens; raise --seq.")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 2, (batch, seq), generator=g)  # vocab-1 is the HF baseline's image token
    ids[:, 1:1 + n_image] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, :1 + n_image] = IGNORE_INDEX
    pixels = torch.randn(batch, 3, image_size, image_size, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype), "labels": labels.to(device)}


def hf_batch(batch: dict, image_token_id: int) -> dict:
    out = dict(batch)
    out["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_INDEX, image_token_id)
    return out


# ----------------------------------------------------------------------------------------------------------- flops
def _matmul_weights(module: torch.nn.Module, exclude=()) -> tuple[int, int]:
    """(trained, frozen) weight counts of the nn.Linear / nn.Conv layers of a module (embeddings are lookups),
    leaving out MoReS (see the module docstring) and anything in `exclude`."""
    from torch.nn.utils import parametrize

    from factory.tuners.mores import MoReS

    skip = {id(m) for e in exclude for m in e.modules()}
    skip |= {id(m) for mores in module.modules() if isinstance(mores, MoReS) for m in mores.modules()}
    trained = frozen = 0
    for sub in module.modules():
        if id(sub) in skip or not isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d)):
            continue
        # a parametrized weight is computed when read (an orthogonal one needs QR, which has no bf16 kernel):
        # count the stored tensor instead
        weight = sub.parametrizations.weight.original if parametrize.is_parametrized(sub, "weight") else sub.weight
        n = weight.numel()
        trained, frozen = (trained + n, frozen) if weight.requires_grad else (trained, frozen + n)
    return trained, frozen


def necessary_flops(vision, connector, llm, vision_cfg, text_cfg, batch: int, seq: int, n_image: int) -> float:
    """The formula of the module docstring, for one optimizer step."""
    tokens, image_tokens = batch * seq, batch * n_image
    v_trained, v_frozen = _matmul_weights(vision)
    c_trained, c_frozen = _matmul_weights(connector)
    l_trained, l_frozen = _matmul_weights(llm)
    vision_fwd_only = v_trained == 0
    flops = (2 if vision_fwd_only else 6) * (v_trained + v_frozen) * image_tokens
    flops += (4 if vision_fwd_only else 12) * vision_cfg.num_hidden_layers * image_tokens * n_image \
        * vision_cfg.hidden_size
    flops += 6 * c_trained * image_tokens + 4 * c_frozen * image_tokens
    flops += 6 * l_trained * tokens + 4 * l_frozen * tokens
    flops += 12 * text_cfg.num_hidden_layers * tokens * seq * text_cfg.hidden_size
    return float(flops)


# ----------------------------------------------------------------------------------------------------------- timing
class PeakMemory:
    """Peak memory of one variant: CUDA allocator peak, or on CPU the sampled peak RSS growth of this process."""

    def __init__(self, device: str):
        self.device, self.peak, self.reserved, self._stop = device, 0, 0, threading.Event()

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return self
        import psutil

        proc = psutil.Process()
        self.base = proc.memory_info().rss

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, proc.memory_info().rss - self.base)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
            # what the caching allocator held at its peak: what a GPU of a given size must really have
            self.reserved = torch.cuda.max_memory_reserved()
        else:
            self._stop.set()
            self._thread.join()

    @property
    def gib(self) -> float:
        return self.peak / 2**30


def time_steps(model, batch: dict, steps: int, warmup: int, device: str) -> float:
    """Seconds per optimizer step, averaged over `steps` after `warmup` untimed ones."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda")
    model.train()

    def step():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()  # waits for the device
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------- run
def bench_variant(args, side: str, tuner: str, dims: dict, dtype, peak) -> dict:
    """Build one model (ours or HF), time it, and return its table row."""
    free(args.device)
    torch.manual_seed(0)
    with PeakMemory(args.device) as mem:
        if side == "ours":
            cfg = compose_config(args.model, tuner, args.size, args.override)
            model = build_ours(cfg, dtype, args.device)
            if args.gradient_checkpointing:
                model.activation_checkpointing_enable()  # as training does (factory/train/loop.py)
            parts = (model.vision, model.connector, model.llm)
            batch = make_batch(args.batch, args.seq, dims["n_image"], dims["image_size"], dims["vocab"], args.device,
                               dtype)
        else:
            model = build_hf(dims["vision_cfg"], dims["text_cfg"], dims["n_image"], tuner, dims["lora_cfg"], dtype,
                             args.device)
            if args.gradient_checkpointing:
                enable_activation_checkpointing(model.model.language_model)
            parts = (model.model.vision_tower, model.model.multi_modal_projector,
                     torch.nn.ModuleList([model.model.language_model, model.lm_head]))
            batch = hf_batch(make_batch(args.batch, args.seq, dims["n_image"], dims["image_size"], dims["vocab"],
                                        args.device, dtype), dims["text_cfg"].vocab_size - 1)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        seconds = time_steps(model, batch, args.steps, args.warmup, args.device)
    flops = necessary_flops(*parts, dims["vision_cfg"], dims["text_cfg"], args.batch, args.seq, dims["n_image"])
    del model, batch
    return {"side": side, "tuner": tuner, "trainable_params": trainable, "step_s": seconds,
            "samples_per_s": args.batch / seconds, "tokens_per_s": args.batch * args.seq / seconds,
            "peak_mem_gib": mem.gib, "peak_reserved_gib": mem.reserved / 2**30, "tflops_per_step": flops / 1e12,
            "mfu": flops / seconds / peak if peak else None}


def probe_dims(args) -> dict:
    """Sizes both sides share, read from our built model (image tokens, image size, vocab, HF sub-configs)."""
    from omegaconf import OmegaConf

    from factory.model import build_model

    cfg = compose_config(args.model, "frozen", args.size, args.override)
    model = build_model(OmegaConf.merge(cfg, {"init": "meta"}))  # shapes only, no memory
    lora_cfg = compose_config(args.model, "lora", args.size, args.override).tuner
    dims = {"n_image": int(model.image_token_count), "image_size": int(model.vision.image_size),
            "vision_cfg": _hf_config_of(model.vision), "text_cfg": model.llm.config,
            "vocab": int(model.llm.config.vocab_size), "lora_cfg": dict(lora_cfg)}
    if args.seq is None:
        args.seq = dims["n_image"] + 71 if args.size == "real" else dims["n_image"] + 32
    del model
    return dims


def markdown(rows: list[dict], args) -> str:
    ours = {r["tuner"]: r for r in rows if r["side"] == "ours"}
    hf = {r["tuner"]: r for r in rows if r["side"] == "hf"}
    lines = [f"model {args.model} ({args.size}), batch {args.batch}, seq {args.seq}, {args.device}, {args.dtype}",
             "", "| variant | trainable | samples/s | tokens/s | step ms | peak GiB | MFU | vs HF (same run) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a"
        ratio = ""
        if r["side"] == "ours" and HF_COUNTERPART.get(r["tuner"]) in hf:
            base = hf[HF_COUNTERPART[r["tuner"]]]
            ratio = f"{r['samples_per_s'] / base['samples_per_s']:.2f}× HF {base['tuner']}"
        name = f"{'factory' if r['side'] == 'ours' else 'HF Llava'} {r['tuner']}"
        lines.append(f"| {name} | {r['trainable_params']:,} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['step_s'] * 1e3:.1f} | {r['peak_mem_gib']:.2f} | {mfu} | {ratio} |")
    if "mores" in ours and "frozen" in ours:
        overhead = ours["frozen"]["samples_per_s"] / ours["mores"]["samples_per_s"] - 1
        lines += ["", f"MoReS overhead vs the frozen model: {overhead * 100:+.1f} % step time"]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llava_3b", help="llava_3b | llava_7b | llava_13b (ignored at --size tiny)")
    p.add_argument("--tuners", default="frozen,mores,lora,full", help="comma-separated tuner names")
    p.add_argument("--baseline", default="hf", choices=["hf", "none"], help="also time HF Llava (+PEFT LoRA)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=None, help="tokens per sample incl. image tokens (default N+71)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--size", default="real", choices=["tiny", "real"])
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on cuda, else fp32")
    p.add_argument("--gradient-checkpointing", action="store_true", help="on the LLM, for both sides")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the 989 TFLOP/s H100 bf16 peak")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override, repeatable")
    p.add_argument("--json", default="bench_throughput.json", help="where to write the results")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    peak = (args.peak_tflops * 1e12 if args.peak_tflops else PEAK_FLOPS.get(args.device)) if dtype == torch.bfloat16 \
        else None
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        dims = probe_dims(args)
        tuners = [t.strip() for t in args.tuners.split(",") if t.strip()]
        rows = [bench_variant(args, "ours", t, dims, dtype, peak) for t in tuners]
        if args.baseline == "hf":
            for t in sorted({HF_COUNTERPART[t] for t in tuners if t in HF_COUNTERPART}):
                rows.append(bench_variant(args, "hf", t, dims, dtype, peak))
    except FactoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = markdown(rows, args)
    print(table)
    import transformers

    report = {"date": datetime.date.today().isoformat(), "device": args.device,
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "args": {k: v for k, v in vars(args).items()}, "rows": rows, "table": table}
    Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
