#!/usr/bin/env python
"""Synthetic LLaVA-format data for throughput runs and smoke tests (no download, deterministic by --seed).

    python scripts/make_synthetic_llava.py OUT --pretrain 16 --instruct 320 --answer-words 60

writes
    OUT/images/synth_0000.png …        --images distinct pictures (colour gradients with a few boxes; small PNGs)
    OUT/pretrain.json                  --pretrain caption samples   ("<image>" + a caption as the answer)
    OUT/instruct.json                  --instruct conversation samples (one question about the image, an answer of
                                       --answer-words words, then --turns − 1 text-only follow-up turns)
in the LLaVA-1.5 JSON format `data.<stage>.json` / `data.<stage>.image_folder` read. The words are drawn from a
small English word list, so any tokenizer encodes them (≈ 1–1.5 tokens per word with BPE/SentencePiece); the
sequence length of a sample is about image tokens + template + turns × (question + answer) tokens.

Use with train.py:
    python train.py model=llava_3b init=random tuner=mores data=llava_v15 \
        data.pretrain.json=OUT/pretrain.json data.pretrain.image_folder=OUT/images \
        data.instruct.json=OUT/instruct.json data.instruct.image_folder=OUT/images
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Dict, List

WORDS = ("the a red blue green small large shape image left right top bottom middle next to above below with "
         "and of in on there is are one two three four five picture colour square circle line edge corner light "
         "dark bright soft sharp round straight near far inside outside between over under across along").split()
QUESTIONS = ("Describe the image in detail.", "What do you see in this picture?", "Explain what the image shows.",
             "What is in the top left corner?", "Which colours appear in the image?")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="output folder (created; existing files of the same names are refused)")
    p.add_argument("--pretrain", type=int, default=16, help="number of caption samples (stage 1)")
    p.add_argument("--instruct", type=int, default=64, help="number of conversation samples (stage 2)")
    p.add_argument("--images", type=int, default=16, help="distinct images; samples cycle through them")
    p.add_argument("--image-size", type=int, default=384, help="side of the square PNGs in pixels")
    p.add_argument("--answer-words", type=int, default=60, help="words per answer")
    p.add_argument("--turns", type=int, default=1, help="question/answer turns per conversation sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an earlier output in the same folder")
    args = p.parse_args(argv)
    for key in ("pretrain", "instruct", "images", "image_size", "answer_words", "turns"):
        minimum = 0 if key in ("pretrain", "instruct") else 1
        if getattr(args, key) < minimum:
            p.error(f"--{key.replace('_', '-')} must be >= {minimum}, got {getattr(args, key)}")
    return args


def words(rng: random.Random, n: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(n))
    return text[0].upper() + text[1:] + "."


def draw_image(rng: random.Random, size: int):
    """A vertical colour gradient with three filled boxes: cheap to encode, and distinct per seed."""
    from PIL import Image, ImageDraw

    top = [rng.randrange(256) for _ in range(3)]
    bottom = [rng.randrange(256) for _ in range(3)]
    column = Image.new("RGB", (1, size))
    for y in range(size):
        t = y / max(size - 1, 1)
        column.putpixel((0, y), tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    image = column.resize((size, size))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.randrange(size), rng.randrange(size)
        x1, y1 = min(size, x0 + rng.randrange(1, size // 2 + 2)), min(size, y0 + rng.randrange(1, size // 2 + 2))
        draw.rectangle([x0, y0, x1, y1], fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def make_samples(rng: random.Random, count: int, images: List[str], kind: str, answer_words: int,
                 turns: int) -> List[Dict]:
    samples = []
    for i in range(count):
        if kind == "pretrain":
            conversation = [{"from": "human", "value": "<image>"},
                            {"from": "gpt", "value": words(rng, max(4, answer_words // 4))}]
        else:
            conversation = [{"from": "human", "value": "<image>\n" + rng.choice(QUESTIONS)},
                            {"from": "gpt", "value": words(rng, answer_words)}]
            for _ in range(turns - 1):
                conversation += [{"from": "human", "value": rng.choice(QUESTIONS)},
                                 {"from": "gpt", "value": words(rng, answer_words)}]
        samples.append({"id": f"synth-{kind}-{i:05d}", "image": images[i % len(images)],
                        "conversations": conversation})
    return samples


def generate(out: Path, pretrain: int = 16, instruct: int = 64, images: int = 16, image_size: int = 384,
             answer_words: int = 60, turns: int = 1, seed: int = 0, force: bool = False) -> Dict[str, Path]:
    """Write the data set (see the module docstring); returns the paths {pretrain, instruct, images}."""
    out = Path(out)
    targets = {"pretrain": out / "pretrain.json", "instruct": out / "instruct.json", "images": out / "images"}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not force:
        raise SystemExit(f"error: {', '.join(existing)} already exist(s); pick another folder or pass --force to "
                         "replace the synthetic data written there before.")
    rng = random.Random(seed)
    targets["images"].mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(images):
        name = f"synth_{i:04d}.png"
        draw_image(rng, image_size).save(targets["images"] / name)
        names.append(name)
    for kind, count in (("pretrain", pretrain), ("instruct", instruct)):
        data = make_samples(rng, count, names, kind, answer_words, turns)
        targets[kind].write_text(json.dumps(data, indent=1) + "\n")
    return targets


def main(argv=None) -> int:
    args = parse_args(argv)
    paths = generate(args.out, args.pretrain, args.instruct, args.images, args.image_size, args.answer_words,
                     args.turns, args.seed, args.force)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
