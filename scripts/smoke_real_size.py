#!/usr/bin/env python
"""Real-size smoke run on a CPU: the paper's models through the training code, in bf16, with random weights.

    nice -n 10 python scripts/smoke_real_size.py                       # llava_3b in bf16 + llava_7b/13b on meta
    python scripts/smoke_real_size.py --model tiny --meta llava_7b     # the same code at test size (seconds)

1. `--model` (default llava_3b) is built with random weights in bf16 (`init=random`, the shipped architecture
   files; nothing is downloaded) and trains `--steps` optimizer steps of stage 2 with MoReS through the pieces
   `train.py` runs for a stage (build_stage_model → build_dataset → train_stage: DeepSpeed ZeRO-2 engine with bf16
   weights and fp32 master weights, the paper trainer's settings) at batch 1 on a synthetic LLaVA sample of at
   least `--seq` tokens holding the encoder's full image span (729 SigLIP tokens for llava_3b). The connector
   starts random (no stage-1 checkpoint). Then it greedily generates `--new-tokens` tokens with the KV cache.
   Printed: build time, every step's time and loss, generation time, the process's peak RSS, and that MoReS's R
   stayed orthonormal.
2. Every `--meta` preset (default llava_7b,llava_13b) is built on the meta device (no memory) and set up like
   stage 2 up to the first forward: image tokens, MoReS's layers and the positions it steers on a tokenized sample,
   TP*, the optimizer's parameter groups, the DeepSpeed config, and the vision tower + connector run on meta
   (output shapes).
Results go to OUT/smoke_real_size.json (`--out`, default a new temporary folder).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without `pip install -e .`
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402

from factory.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from factory.errors import FactoryError  # noqa: E402

# real tokenizers (no weights): the test fixtures of this checkout, or a developer's ../shared copy
FIXTURES = [REPO / "tests" / "fixtures" / "tokenizers", REPO.parent / "shared" / "fixtures" / "tokenizers"]
REAL_TOKENIZERS = {"llava_3b": "gpt2/phi2_codegen", "llava_7b": "llama", "llava_13b": "llama"}
EXPECTED_TP = {"llava_3b": 163_872, "llava_7b": 262_176, "llava_13b": 409_640}  # MoReS-B, all layers (paper)


def gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 2)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def cpu_seconds() -> float:
    """CPU time of this process (user + system, all threads): on a shared machine the wall time of a step depends on
    the other jobs, its CPU time much less."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def tokenizer_for(model: str, given: str | None) -> str:
    """--tokenizer, else the real tokenizer of the preset when a fixture folder has it, else the tiny tokenizer
    (any LLM vocabulary holds its 512 ids; with random weights the tokenizer only sets the text length)."""
    if given:
        return given
    for root in FIXTURES:
        if model in REAL_TOKENIZERS and (root / REAL_TOKENIZERS[model]).is_dir():
            return str(root / REAL_TOKENIZERS[model])
    from factory.testing import tiny_tokenizer_dir

    return str(tiny_tokenizer_dir())


def compose_stage2(model: str, run_dir: Path, data: dict, tokenizer: str, steps: int, init: str = "random"):
    """`train.py model=<model> init=random tuner=mores stage=instruct trainer=paper` with bf16, batch 1 and
    `steps` steps; model=tiny is the tiny_config model family of the tests (SigLIP + Phi) instead."""
    from omegaconf import OmegaConf

    from factory.config import compose

    overrides = ["tuner=mores", "stage=instruct", "trainer=paper", "logger=none", "data=llava_v15",
                 f"init={init}", f"run_dir={run_dir}", "trainer.precision=bf16", f"trainer.max_steps={steps}",
                 "trainer.instruct.global_batch_size=1", "trainer.instruct.micro_batch_size=1",
                 "trainer.num_workers=0", f"data.instruct.json={data['instruct']}",
                 f"data.instruct.image_folder={data['images']}"]
    if model == "tiny":
        from factory.testing import tiny_config

        cfg = compose(overrides)
        OmegaConf.set_struct(cfg, False)
        cfg = OmegaConf.merge(cfg, tiny_config(llm="phi", vision="hf_siglip"))
    else:
        cfg = compose([f"model={model}", f"llm.tokenizer={tokenizer}", *overrides])
    OmegaConf.set_struct(cfg, False)
    cfg.eval = {"enabled": False}
    return cfg


def image_geometry(cfg) -> tuple[int, int]:
    """(image tokens, image size) of the configured vision tower, read from a meta build (no memory)."""
    from omegaconf import OmegaConf

    from factory.model.build import build_model

    model = build_model(OmegaConf.merge(cfg, {"init": "meta"}))
    return int(model.image_token_count), int(model.vision.image_size)


def synthetic_data(folder: Path, n_image: int, image_size: int, min_seq: int, samples: int = 2) -> dict:
    """Conversation samples whose answer alone has ≥ min_seq − n_image tokens (every word is ≥ 1 token)."""
    from make_synthetic_llava import generate

    words = max(8, min_seq - n_image)
    return {k: str(v) for k, v in generate(folder, pretrain=0, instruct=samples, images=1, image_size=image_size,
                                           answer_words=words).items()}


def orthonormality_error(model) -> float:
    worst = 0.0
    rotations = {f"layer{k}.R": m.rotation().detach() for k, m in model.llm.mores.interventions.items()}
    for key, value in rotations.items():
        if key.endswith(".R"):
            value = value.double()
            worst = max(worst, float((value.t() @ value - torch.eye(value.shape[1], dtype=value.dtype)).abs().max()))
    return worst


def real_run(model_name: str, out: Path, steps: int, min_seq: int, new_tokens: int, tokenizer: str | None) -> dict:
    """Part 1 (see the module docstring)."""
    from factory.distributed import init_distributed
    from factory.train.loop import StageContext, train_stage
    from factory.train.metrics import MetricsFile, WandbLogger
    from factory.train.recipe import build_dataset, build_stage_model
    from factory.stages import plan_stages

    tokenizer = tokenizer_for(model_name, tokenizer)
    run_dir = out / f"run_{model_name}"
    probe = compose_stage2(model_name, run_dir, {"instruct": "-", "images": "-"}, tokenizer, steps)
    n_image, image_size = image_geometry(probe)
    data = synthetic_data(out / "data", n_image, image_size, min_seq)
    cfg = compose_stage2(model_name, run_dir, data, tokenizer, steps)
    dist = init_distributed()
    spec = plan_stages(cfg)[0]
    rss0 = current_rss_bytes()

    started, cpu0 = time.perf_counter(), cpu_seconds()
    model = build_stage_model(cfg, spec, None, torch.bfloat16)
    build_s, build_cpu = time.perf_counter() - started, cpu_seconds() - cpu0
    rss_built = current_rss_bytes()
    dataset, collate = build_dataset(cfg, spec, model)
    sample = dataset[0]
    seq = len(sample["input_ids"])
    span = int((torch.as_tensor(sample["input_ids"]) == IMAGE_TOKEN_INDEX).sum())
    if seq < min_seq or span != n_image:
        raise FactoryError(f"The synthetic sample has {seq} tokens and an image span of {span} (wanted ≥ {min_seq} "
                           f"and {n_image}); raise --seq or check the tokenizer {tokenizer}.")

    ctx = StageContext(cfg=cfg, dist=dist, run_dir=run_dir, dtype=torch.bfloat16,
                       metrics=MetricsFile(run_dir / "metrics.jsonl"),
                       wandb=WandbLogger({"name": "none"}, run_dir, {}, enabled=False))
    run_dir.mkdir(parents=True, exist_ok=True)
    started, cpu0 = time.perf_counter(), cpu_seconds()
    result = train_stage(model, spec, dataset, collate, ctx)
    train_s, train_cpu = time.perf_counter() - started, cpu_seconds() - cpu0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    # greedy generation with the KV cache, from the sample's prompt (everything before its first label token)
    labels = torch.as_tensor(sample["labels"])
    prompt_len = int((labels != IGNORE_INDEX).nonzero()[0]) if bool((labels != IGNORE_INDEX).any()) else seq
    prompt = torch.as_tensor(sample["input_ids"][:prompt_len])[None]
    pixels = sample["pixel_values"][None].to(torch.bfloat16)
    started, cpu0 = time.perf_counter(), cpu_seconds()
    tokens = model.generate(prompt, torch.ones_like(prompt), pixels, max_new_tokens=new_tokens, eos_token_id=[])[0]
    generate_s, generate_cpu = time.perf_counter() - started, cpu_seconds() - cpu0

    report = {
        "model": model_name, "dtype": "bf16", "tokenizer": tokenizer, "threads": torch.get_num_threads(),
        "seq": seq, "image_tokens": span, "batch": 1, "gradient_checkpointing": bool(cfg.trainer.gradient_checkpointing),
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "tp_star": sum(p.numel() for p in model.llm.parameters() if p.requires_grad),
        "build_s": round(build_s, 1), "build_cpu_s": round(build_cpu, 1), "train_stage_s": round(train_s, 1),
        "train_stage_cpu_s": round(train_cpu, 1), "load_average": [round(x, 1) for x in os.getloadavg()],
        "step_s": [round(r["samples_per_s"] and 1.0 / r["samples_per_s"], 2) for r in records],
        "losses": [round(r["loss"], 4) for r in records],
        "generated": tokens, "prompt_tokens": prompt_len, "generate_s": round(generate_s, 1),
        "generate_cpu_s": round(generate_cpu, 1),
        "mores_orthonormality_error": orthonormality_error(model),
        "rss_before_build_gib": gib(rss0), "rss_after_build_gib": gib(rss_built),
        "peak_rss_gib": gib(peak_rss_bytes()), "checkpoint": str(result.checkpoint),
    }
    if len(tokens) != new_tokens or len(records) != steps or not all(map(lambda x: x == x, report["losses"])):
        raise FactoryError(f"The smoke run did not complete as asked: {report}")
    return report


def meta_setup(model_name: str, out: Path, min_seq: int, tokenizer: str | None) -> dict:
    """Part 2: the stage-2 setup of a preset on the meta device, up to (not including) the first forward."""
    from omegaconf import OmegaConf

    from factory.model.build import build_model
    from factory.train.engine import deepspeed_config
    from factory.train.optim import build_optimizer
    from factory.train.recipe import build_dataset
    from factory.stages import gradient_accumulation, plan_stages
    from factory.tuners import apply_tuning

    tokenizer = tokenizer_for(model_name, tokenizer)
    probe = compose_stage2(model_name, out, {"instruct": "-", "images": "-"}, tokenizer, 1, init="meta")
    n_image, image_size = image_geometry(probe)
    data = synthetic_data(out / f"data_{model_name}", n_image, image_size, min_seq)
    cfg = compose_stage2(model_name, out, data, tokenizer, 1, init="meta")
    cfg.trainer.instruct.global_batch_size, cfg.trainer.instruct.micro_batch_size = 128, 16  # the paper's recipe
    spec = plan_stages(cfg)[0]
    started = time.perf_counter()
    model = build_model(cfg, dtype=torch.bfloat16)
    tuning = apply_tuning(model, cfg.tuner, spec.tune)
    build_s = time.perf_counter() - started
    model.template = spec.template
    dataset, collate = build_dataset(cfg, spec, model)
    batch = collate([dataset[0], dataset[1]])

    mores = model.llm.mores
    image_mask = batch["input_ids"] == IMAGE_TOKEN_INDEX
    mores.observe_batch(image_mask, batch["attention_mask"])
    starts = [int(row.nonzero()[0]) for row in image_mask]
    expected = [list(range(s, s + 4)) + list(range(s + n_image - 5, s + n_image)) for s in starts]  # f4+l5
    positions = mores.positions.tolist()

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, lr=float(spec.hparams.lr), weight_decay=0.0)
    groups = [{"tensors": len(g["params"]), "numel": sum(p.numel() for p in g["params"]),
               "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    accum = gradient_accumulation(spec.name, 128, 16, 1)
    ds = deepspeed_config(cfg.deepspeed, 16, accum, 1, cfg.trainer.max_grad_norm, torch.bfloat16)

    # vision tower + connector on meta: the shapes the first forward would splice into the LLM's embeddings
    pixels = batch["pixel_values"].to("meta", torch.bfloat16)
    features = model.encode_images(pixels)
    hidden = int(model.llm.config.hidden_size)
    layers = len(mores.layer_ids)
    report = {
        "model": model_name, "device": "meta", "tokenizer": tokenizer, "build_s": round(build_s, 2),
        "seq": int(batch["input_ids"].shape[1]), "image_tokens": n_image, "llm_layers": layers, "hidden": hidden,
        "connector_output": list(features.shape), "mores_R_shape": list(mores.interventions["0"].rotation().shape),
        "positions": positions, "positions_expected": expected, "tp_star": tuning["trainable_llm"],
        "tp_star_paper": EXPECTED_TP.get(model_name), "trainable_connector": tuning["trainable_connector"],
        "param_groups": groups, "deepspeed": {k: ds[k] for k in ("train_micro_batch_size_per_gpu",
                                                                 "gradient_accumulation_steps", "train_batch_size",
                                                                 "bf16", "zero_optimization")},
    }
    problems = []
    if positions != expected:
        problems.append(f"MoReS positions {positions} != first 4 + last 5 of the image span {expected}")
    if list(features.shape) != [len(starts), n_image, hidden]:
        problems.append(f"connector output {list(features.shape)} != [{len(starts)}, {n_image}, {hidden}]")
    if EXPECTED_TP.get(model_name) is not None and tuning["trainable_llm"] != EXPECTED_TP[model_name]:
        problems.append(f"TP* {tuning['trainable_llm']:,} != the paper's {EXPECTED_TP[model_name]:,}")
    if sum(g["numel"] for g in groups) != tuning["trainable_total"]:
        problems.append("the optimizer's parameter groups do not hold exactly the trainable parameters")
    if problems:
        raise FactoryError(f"{model_name} on meta: " + "; ".join(problems))
    return report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llava_3b", help="preset trained for real in bf16: llava_3b (default) | tiny")
    p.add_argument("--meta", default="llava_7b,llava_13b", help="presets set up on meta (comma list, '' for none)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps")
    p.add_argument("--seq", type=int, default=800, help="minimum tokens of the training sample (image span included)")
    p.add_argument("--new-tokens", type=int, default=4, help="tokens to generate greedily with the KV cache")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: tests/fixtures or tiny)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: a new temporary folder)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.new_tokens < 1 or args.seq < 1:
        p.error("--steps, --new-tokens and --seq must be positive")
    if args.model in ("llava_7b", "llava_13b"):
        p.error(f"--model {args.model} does not fit a 24 GB CPU machine in bf16 training; pass it to --meta instead")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="smoke_real_size-"))
    if (out / "smoke_real_size.json").exists():
        print(f"error: {out / 'smoke_real_size.json'} exists; pass another --out folder.", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    report = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        for name in [m.strip() for m in args.meta.split(",") if m.strip()]:
            report[f"meta_{name}"] = entry = meta_setup(name, out, args.seq, args.tokenizer)
            print(f"[meta] {name}: seq {entry['seq']}, {entry['image_tokens']} image tokens, {entry['llm_layers']} "
                  f"MoReS layers, positions {entry['positions'][0]}, TP* {entry['tp_star']:,}, connector "
                  f"{entry['connector_output']}, param groups {entry['param_groups']}", flush=True)
        if args.model:
            report["real"] = real = real_run(args.model, out, args.steps, args.seq, args.new_tokens, args.tokenizer)
            print(f"[bf16] {real['model']}: {real['params'] / 1e9:.2f}B params, seq {real['seq']} "
                  f"({real['image_tokens']} image tokens), build {real['build_s']} s, steps {real['step_s']} s "
                  f"(stage {real['train_stage_s']} s wall, {real['train_stage_cpu_s']} s CPU), "
                  f"losses {real['losses']}, generated {real['generated']} in {real['generate_s']} s, peak RSS {real['peak_rss_gib']} GiB, "
                  f"R orthonormal to {real['mores_orthonormality_error']:.1e}", flush=True)
    except FactoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    (out / "smoke_real_size.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {out / 'smoke_real_size.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
