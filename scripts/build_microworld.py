"""Rebuild the pretrained micro-world bases in factory/assets/microworld/ (deterministic for a fixed thread count).

    python scripts/build_microworld.py [--out factory/assets/microworld] [--seed 0] [--parts all]
    python scripts/build_microworld.py --check     (measure the bases in --out: scripts/microworld_check.py)

The parts, in order (`--parts tokenizer,vision,phi,llama`; the LMs need the tokenizer in --out and are the long
part: run them as two processes side by side, one thread each, docs/microworld.md "Rebuilding the bases"):
1. tokenizer – byte-level BPE trained with `tokenizers` on micro-world text and the chat-template words, written
               into phi/ and llama/ (the Phi flavour ends turns with <|endoftext|>, the Vicuna one with </s>);
2. vision/   – the vision tower of a tiny CLIPModel trained contrastively (CLIPModel's own loss) on images vs
               captions, saved as CLIPVisionModel + CLIPImageProcessor;
3. phi/, llama/ – PhiForCausalLM / LlamaForCausalLM trained from scratch on micro-world TEXT only, freshly generated
               at every step from the training distribution (scenes with the world's language prior): the
               recipe of scripts/microworld_lm_reading.py with LM_RECIPE (chat-template conversations, the caption
               where the image will be, answer-only loss).
Everything loads with plain `from_pretrained`. No eval scene is ever trained on. BUILD.json records the settings,
the measured quality numbers and the wall time of each part.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from factory.data.microworld import generate_microworld  # noqa: E402

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|endoftext|>", "<image>"]
# End-of-turn token of each chat format (PAPER.md §3): Phi ends turns with <|endoftext|>, Vicuna with </s>.
EOS = {"phi": "<|endoftext|>", "llama": "</s>"}
VOCAB_SIZE = 512
IMAGE_SIZE, PATCH = 32, 8
MAX_POSITIONS = 512
# The LMs' recipe (scripts/microworld_lm_reading.py options): measured in docs/microworld.md, "Rebuilding the bases".
LM_RECIPE = dict(width=128, layers=4, heads=4, batch=32, turns=8, steps=5500, lr=1e-3, copy=0.2, no_caption=0.15)
PARTS = ("tokenizer", "vision", "phi", "llama")
VISION_IMAGES, VISION_EPOCHS = 4000, 30  # docs/microworld.md: the cell probe needs more than 2,000 images × 24 epochs


def chat_text(conversations, eos: str, context: str = "") -> str:
    """The phi / vicuna_v1 rendering of a conversation for text-only pretraining: the image marker is replaced by
    `context` (the image's caption, or nothing)."""
    out = SYSTEM + " "
    for turn in conversations:
        text = turn["value"].replace("<image>\n", f"{context}\n" if context else "").replace("<image>", context)
        out += f"USER: {text} " if turn["from"] == "human" else f"ASSISTANT: {text}{eos}"
    return out


# --------------------------------------------------------------------------------------------------- tokenizer
def build_tokenizers(texts) -> dict:
    """One byte-level BPE vocabulary, wrapped twice: the Phi flavour (eos <|endoftext|>) and the Llama one (</s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return {arch: PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token=eos, pad_token="<pad>",
        additional_special_tokens=["<image>"] + [t for t in EOS.values() if t != eos],
        model_max_length=MAX_POSITIONS) for arch, eos in EOS.items()}


# ------------------------------------------------------------------------------------------------------ vision
def build_vision(world: Path, heldout: Path, tokenizer, out: Path, seed: int, epochs: int) -> dict:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModel

    torch.manual_seed(seed)
    eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, eos_token_id=eos_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=64, intermediate_size=256,
                           num_hidden_layers=4, num_attention_heads=4),
        projection_dim=64)
    model = CLIPModel(config)
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE,
                                   "width": IMAGE_SIZE}, do_convert_rgb=True)

    def load(root: Path):
        entries = json.loads((root / "pretrain.json").read_text())
        images = [Image.open(root / "images" / e["image"]).convert("RGB") for e in entries]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        caps = [e["conversations"][-1]["value"] + "<|endoftext|>" for e in entries]
        text = tokenizer(caps, padding=True, add_special_tokens=False, return_tensors="pt")
        return pixels, text["input_ids"], text["attention_mask"]

    pixels, ids, mask = load(world)
    held_pixels, held_ids, held_mask = load(heldout)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    batch, steps = 128, epochs * ((len(pixels) + 127) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(pixels), generator=gen).split(batch):
            loss = model(input_ids=ids[idx], attention_mask=mask[idx], pixel_values=pixels[idx], return_loss=True).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():  # image → caption retrieval among held-out images: does the tower see the scene?
        img = model.get_image_features(pixel_values=held_pixels)
        txt = model.get_text_features(input_ids=held_ids, attention_mask=held_mask)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        sims = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
        retrieval = (sims.argmax(-1) == torch.arange(len(sims))).float().mean().item()

    vision = CLIPVisionModel(config.vision_config)
    # Some transformers versions nest the tower under `.vision_model`, others flatten it into CLIPVisionModel.
    getattr(vision, "vision_model", vision).load_state_dict(model.vision_model.state_dict())
    vision.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return {"final_loss": round(loss.item(), 4), "heldout_retrieval_top1": round(retrieval, 4),
            "heldout_images": len(sims), "epochs": epochs}


# --------------------------------------------------------------------------------------------------------- LMs
def build_lm(arch: str, out: Path, seed: int, threads: int, steps: int, width: int) -> dict:
    """Train the `arch` LM with LM_RECIPE (its `steps` and `width` overridable) on the tokenizer in out/arch."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # microworld_lm_reading.py sits beside this script
    from microworld_lm_reading import parse_args, train

    recipe = dict(LM_RECIPE, steps=steps, width=width)
    argv = ["--arch", arch, "--tokenizer", str(out), "--out", str(out / arch), "--seed", str(seed),
            "--threads", str(threads), "--eval-every", str(10 ** 9)]
    argv += [f"--{key.replace('_', '-')}={value}" for key, value in recipe.items()]
    report = train(parse_args(argv))
    return {k: report[k] for k in ("params", "steps", "train_seconds", "final_loss", "lm_caption_accuracy",
                                   "lm_no_caption_accuracy")} | {"recipe": recipe}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "factory" / "assets" / "microworld"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="all", help=f"comma list of {', '.join(PARTS)} (or all)")
    parser.add_argument("--vision-epochs", type=int, default=VISION_EPOCHS)
    parser.add_argument("--lm-steps", type=int, default=LM_RECIPE["steps"])
    parser.add_argument("--lm-width", type=int, default=LM_RECIPE["width"])
    parser.add_argument("--train-images", type=int, default=2000,
                        help="training images of the world the tokenizer is trained on")
    parser.add_argument("--vision-images", type=int, default=VISION_IMAGES,
                        help="training images (with captions) the vision tower learns from")
    # Results are bit-reproducible for a fixed thread count (float reductions are ordered per thread layout).
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--check", action="store_true",
                        help="build nothing: measure the bases in --out (scripts/microworld_check.py) and print them")
    args = parser.parse_args(argv)
    if args.check:
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # microworld_check.py sits beside this script
        from microworld_check import check

        print(json.dumps(check(Path(args.out))))
        return 0
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        report = _build(args)
    finally:
        torch.set_num_threads(previous_threads)  # callers (tests) keep their own setting
    print(json.dumps(report))
    return 0


def _parts(value: str) -> list:
    parts = list(PARTS) if value == "all" else [p.strip() for p in value.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise SystemExit(f"--parts: unknown part(s) {unknown or value!r}; choose from {', '.join(PARTS)} or all.")
    return [p for p in PARTS if p in parts]  # always in build order: the LMs and the tower need the tokenizer


def _build(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = _parts(args.parts)
    start = time.time()
    report = {"seed": args.seed, "threads": args.threads, "train_images": args.train_images, "timings_s": {}}

    with tempfile.TemporaryDirectory() as tmp:
        if "tokenizer" in parts:
            # The tokenizer and the tower learn from the training split of the world with data seed --seed (0 = the
            # default world); the LMs draw their own scenes from the same distribution (microworld_lm_reading.py).
            world = generate_microworld(Path(tmp) / "world", seed=args.seed, num_train_images=args.train_images,
                                        num_eval_images=10, num_pope_images=0, image_size=IMAGE_SIZE)
        if "tokenizer" in parts:
            t = time.time()
            pretrain = json.loads((world / "pretrain.json").read_text())
            instruct = json.loads((world / "instruct.json").read_text())
            captions = [e["conversations"][-1]["value"] for e in pretrain]
            corpus = captions + [chat_text(e["conversations"], eos) for e in pretrain + instruct
                                 for eos in EOS.values()]
            for arch, tokenizer in build_tokenizers(corpus + [SYSTEM + " USER: ASSISTANT:"]).items():
                tokenizer.save_pretrained(out / arch)
            report["timings_s"]["tokenizer"] = round(time.time() - t, 1)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(out / "phi")
        report["tokenizer"] = {"vocab_size": len(tokenizer),
                               "system_prompt_tokens": len(tokenizer(SYSTEM)["input_ids"])}
        if "vision" in parts:
            t = time.time()
            # Captioned images from another seed, only to measure the tower's image → caption retrieval.
            heldout = generate_microworld(Path(tmp) / "heldout", seed=args.seed + 1000,
                                          num_train_images=min(200, args.vision_images), num_eval_images=1,
                                          num_pope_images=0, image_size=IMAGE_SIZE)
            # the first --train-images of these are the tokenizer's images (one training stream per seed)
            images = generate_microworld(Path(tmp) / "vision", seed=args.seed, num_train_images=args.vision_images,
                                         num_eval_images=1, num_pope_images=0, image_size=IMAGE_SIZE)
            report["vision"] = build_vision(images, heldout, tokenizer, out / "vision", args.seed, args.vision_epochs)
            report["vision_images"] = args.vision_images
            report["timings_s"]["vision"] = round(time.time() - t, 1)
        for arch in ("phi", "llama"):
            if arch in parts:
                t = time.time()
                report[arch] = build_lm(arch, out, args.seed, args.threads, args.lm_steps, args.lm_width)
                report["timings_s"][arch] = round(time.time() - t, 1)

    report["timings_s"]["total"] = round(time.time() - start, 1)
    return _record(out, report, parts)


def _record(out: Path, report: dict, parts: list) -> dict:
    """Merge this build's parts into BUILD.json (parts built by other processes keep their entries)."""
    path = out / "BUILD.json"
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        previous = {}
    merged = dict(previous, **{k: v for k, v in report.items() if k != "timings_s"})
    merged["timings_s"] = dict(previous.get("timings_s", {}), **{k: v for k, v in report["timings_s"].items()
                                                                  if k != "total"})
    merged["size_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.name != "BUILD.json")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    tmp.replace(path)  # atomic: the LMs finish in parallel processes
    return dict(report, parts=parts)


if __name__ == "__main__":
    sys.exit(main())
