"""How competent the micro-world bases are, measured on held-out scenes (docs/microworld.md, "Measured quality").

    python scripts/microworld_check.py [--assets factory/assets/microworld] [--questions 2500] [--probe-images 2000]
    python scripts/build_microworld.py --check          (the same, for the shipped assets)

* `lm_caption_accuracy`: each LM, text only, answers held-out questions (data seed 0's eval stream: the default
  world's 500 eval.json questions and, with --questions 2500, the next 2,000; answer-balanced per template) with the
  scene's caption written where the image would be — the prompt its chat template builds for
  `<caption>\\n<question>`, greedy, scored as the micro-world eval scores (factory.eval.microworld_reading). What a
  frozen LM can do with perfectly caption-like image embeddings.
* `lm_no_caption_accuracy`: the same questions without the caption; a base that cannot see must stay at chance
  (`chance`: 1 / the size of the type's answer set). 500 questions per type, because an LM that answers from a
  prior (a different answer per question) scatters by ±5 points around chance on 100 questions per type.
* `vision_probe_accuracy`: a linear probe (softmax regression) on the tower's layer −2 patch features of each grid
  cell (its 2×2 patches, concatenated) reads the cell's colour, shape and emptiness; trained on images of one world,
  scored on the images of another (data seeds 7 and 8).

The last stdout line is one JSON object with these figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from factory.data.microworld import (COLORS, POSITIONS, QUESTION_TYPES, SHAPES, chance_level,  # noqa: E402
                                     generate_microworld)
from factory.eval import microworld_reading as reading  # noqa: E402

LM_TEMPLATES = {"phi": "phi", "llama": "vicuna_v1"}  # asset folder → the chat template its LM was trained in
EMPTY = "empty"


def lm_reading(folder: Path, template: str, entries: List[dict], with_caption: bool) -> dict:
    """Greedy answers of the LM in `folder` to `entries` (eval.json rows), per question type (percent)."""
    from transformers import AutoTokenizer

    result = reading.lm_reading(folder, AutoTokenizer.from_pretrained(folder), template,
                                reading.reading_rows(entries, with_caption))
    return reading.per_type_percent(result)


def _cell_labels(entries: List[dict]) -> List[List[tuple]]:
    """(colour, shape) or (EMPTY, EMPTY) per grid cell, read back from each image's caption."""
    import re

    labels = []
    for e in entries:
        found = re.findall(r"a (\w+) (\w+) in the (\w+ \w+)", e["conversations"][1]["value"])
        objects = {pos: (c, s) for c, s, pos in found}
        labels.append([objects.get(pos, (EMPTY, EMPTY)) for pos in POSITIONS])
    return labels


@torch.no_grad()
def _cell_features(folder: Path, root: Path, entries: List[dict]) -> torch.Tensor:
    from transformers import CLIPImageProcessor, CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(folder).eval()
    processor = CLIPImageProcessor.from_pretrained(folder)
    feats = []
    for start in range(0, len(entries), 200):
        images = [Image.open(root / "images" / e["image"]).convert("RGB") for e in entries[start:start + 200]]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        patches = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        side = int(round(patches.shape[1] ** 0.5))
        grid = patches.reshape(len(images), side, side, -1)
        half = side // 2  # the world's 2×2 grid: each cell is a half × half block of patches
        feats.append(torch.stack([grid[:, r:r + half, c:c + half].flatten(1)
                                  for r in (0, half) for c in (0, half)], 1))
    return torch.cat(feats)  # [images, 4 cells, half*half*width]


def _probe(train_x, train_y, test_x, test_y, classes: int, steps: int = 1500) -> float:
    torch.manual_seed(0)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    probe = torch.nn.Linear(train_x.shape[1], classes)
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-2, weight_decay=1e-3)
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(probe(train_x), train_y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return round(100 * (probe(test_x).argmax(-1) == test_y).float().mean().item(), 1)


def vision_probe(folder: Path, images: int) -> dict:
    """Linear-probe accuracy (percent) of the cell's colour and shape (cells with an object) and emptiness."""
    with tempfile.TemporaryDirectory() as tmp:
        data = {}
        for split, seed in (("train", 7), ("test", 8)):
            root = generate_microworld(Path(tmp) / split, seed=seed, num_train_images=images, num_eval_images=1,
                                       num_pope_images=0,
                                       image_size=json.loads((folder / "config.json").read_text())["image_size"])
            entries = json.loads((root / "pretrain.json").read_text())
            data[split] = (_cell_features(folder, root, entries).flatten(0, 1),
                           [cell for row in _cell_labels(entries) for cell in row])
    result = {}
    for name, values, index in (("color", list(COLORS), 0), ("shape", list(SHAPES), 1)):
        rows = {split: [i for i, cell in enumerate(labels) if cell[0] != EMPTY] for split, (_, labels) in data.items()}
        x = {split: data[split][0][rows[split]] for split in data}
        y = {split: torch.tensor([values.index(data[split][1][i][index]) for i in rows[split]]) for split in data}
        result[name] = _probe(x["train"], y["train"], x["test"], y["test"], len(values))
    empty = {split: torch.tensor([int(cell[0] == EMPTY) for cell in labels]) for split, (_, labels) in data.items()}
    result["empty"] = _probe(data["train"][0], empty["train"], data["test"][0], empty["test"], 2)
    return result


def check(assets: Path, questions: int = 2500, probe_images: int = 2000) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_microworld(Path(tmp) / "w", seed=0, num_train_images=1, num_eval_images=questions,
                                   num_pope_images=0)
        entries = json.loads((root / "eval.json").read_text())
    report = {"questions": len(entries), "chance": {t: round(100 * chance_level(t), 1) for t in QUESTION_TYPES},
              "lm_caption_accuracy": {}, "lm_no_caption_accuracy": {}}
    for arch, template in LM_TEMPLATES.items():
        report["lm_caption_accuracy"][arch] = lm_reading(assets / arch, template, entries, with_caption=True)
        report["lm_no_caption_accuracy"][arch] = lm_reading(assets / arch, template, entries, with_caption=False)
    report["vision_probe_accuracy"] = vision_probe(assets / "vision", probe_images)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--assets", default=str(REPO / "factory" / "assets" / "microworld"))
    parser.add_argument("--questions", type=int, default=2500,
                        help="held-out questions: the default world's 500, then more of the same eval stream")
    parser.add_argument("--probe-images", type=int, default=2000, help="images per probe split")
    args = parser.parse_args(argv)
    print(json.dumps(check(Path(args.assets), args.questions, args.probe_images)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
