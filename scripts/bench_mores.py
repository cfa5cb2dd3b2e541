"""MoReS overhead vs the frozen model: time of one training step (forward + backward + optimizer) per tuner.

    python scripts/bench_mores.py                       # CPU, a small-but-not-tiny LLaVA (random weights)
    python scripts/bench_mores.py --device cuda --hidden 2048 --layers 24 --image-size 336 --patch-size 14

Every row trains the connector (stage 2); the rows differ only in what the LLM gets: nothing (frozen), MoReS at the
paper's f4+l5 positions, MoReS on every visual token, and LoRA for scale. The MoReS hooks gather the selected rows,
transform them and scatter them back, so their cost should be a few percent at most.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from factory.constants import IMAGE_TOKEN_INDEX  # noqa: E402
from factory.testing import tiny_model  # noqa: E402
from factory.tuners import apply_tuning  # noqa: E402

ROWS = [
    ("frozen LLM (connector only)", {"name": "frozen"}),
    ("mores d=1, f4+l5", {"name": "mores", "rank": 1, "positions": "f4+l5"}),
    ("mores d=4, f4+l5", {"name": "mores", "rank": 4, "positions": "f4+l5"}),
    ("mores d=1, all visual tokens", {"name": "mores", "rank": 1, "positions": "all"}),
    ("lora r=16 (reference)", {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.05}),
]


def make_batch(model, batch: int, text: int, device: str):
    n = model.image_token_count
    ids = torch.randint(5, 500, (batch, n + text))
    for b in range(batch):  # image spans at different offsets, as in real data
        start = 1 + (b * 3) % max(1, text - 2)
        ids[b, start:start + n] = IMAGE_TOKEN_INDEX
    mask = torch.ones_like(ids)
    labels = torch.where(ids >= 0, ids, torch.full_like(ids, -100))
    pixels = torch.randn(batch, 3, model.vision.image_size, model.vision.image_size)
    return [t.to(device) for t in (ids, mask, pixels, labels)]


def one_step(model, optimizer, batch, device: str, dtype) -> float:
    ids, mask, pixels, labels = batch
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(ids, mask, pixels.to(dtype), labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--llm", default="llama", choices=["phi", "llama"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=4)  # (64/4)² = 256 image tokens
    parser.add_argument("--text", type=int, default=64, help="text tokens per sample besides the image tokens")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    runs = []
    for label, tuner in ROWS:
        model = tiny_model(llm=args.llm, hidden=args.hidden, layers=args.layers, image_size=args.image_size,
                           patch_size=args.patch_size, vision_hidden=min(args.hidden, 256)).to(args.device)
        report = apply_tuning(model, tuner)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        torch.manual_seed(0)
        runs.append((label, report["trainable_llm"], model, optimizer, make_batch(model, args.batch, args.text,
                                                                                    args.device)))
    # Round-robin over the configurations so that load changes on the machine hit every row alike.
    times = {label: [] for label, *_ in runs}
    for step in range(args.warmup + args.steps):
        for label, _, model, optimizer, batch in runs:
            seconds = one_step(model, optimizer, batch, args.device, dtype)
            if step >= args.warmup:
                times[label].append(seconds)
    results = [(label, tp, statistics.median(times[label])) for label, tp, *_ in runs]

    base = results[0][2]
    seq = (args.image_size // args.patch_size) ** 2 + args.text
    print(f"device={args.device} llm={args.llm} hidden={args.hidden} layers={args.layers} batch={args.batch} "
          f"seq={seq} ({(args.image_size // args.patch_size) ** 2} image tokens) dtype={str(dtype).split('.')[-1]}")
    print("| LLM tuner | TP* | ms / step (median) | overhead vs frozen |")
    print("|---|---:|---:|---:|")
    for label, tp, seconds in results:
        print(f"| {label} | {tp:,} | {seconds * 1e3:.1f} | {100 * (seconds / base - 1):+.1f} % |")


if __name__ == "__main__":
    main()
