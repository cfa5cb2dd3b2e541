"""Rebuild the pretrained micro-world bases in factory/assets/microworld/ (deterministic, a few CPU minutes).

    python scripts/build_microworld.py [--out factory/assets/microworld] [--seed 0]
    python scripts/build_microworld.py --check     (measure the bases in --out: scripts/microworld_check.py)

1. tokenizer/ – byte-level BPE trained with `tokenizers` on micro-world text and the chat-template words;
2. vision/    – the vision tower of a tiny CLIPModel trained contrastively (CLIPModel's own loss) on images vs
                captions,
                saved as CLIPVisionModel + CLIPImageProcessor;
3. phi/, llama/ – tiny PhiForCausalLM / LlamaForCausalLM trained on micro-world TEXT only (captions and the
                question/answer turns in the phi / vicuna_v1 chat format, no images), each with its tokenizer.
Everything loads with plain `from_pretrained`. Training uses only the training split (eval questions stay unseen).
BUILD.json records the settings, the measured quality numbers and the wall time of each part.
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
LM_SHAPE = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                max_position_embeddings=512)


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
        model_max_length=LM_SHAPE["max_position_embeddings"]) for arch, eos in EOS.items()}


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
def build_lm(arch: str, texts, tokenizer, out: Path, seed: int, epochs: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

    torch.manual_seed(seed)
    special = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    if arch == "phi":
        model = PhiForCausalLM(PhiConfig(**LM_SHAPE, **special, partial_rotary_factor=0.5))
    else:
        model = LlamaForCausalLM(LlamaConfig(**LM_SHAPE, **special, num_key_value_heads=4))
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batch = 32
    steps = epochs * ((len(enc) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(enc), generator=gen).split(batch):
            rows = [enc[i] for i in idx.tolist()]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), tokenizer.pad_token_id)
            labels = torch.full((len(rows), width), -100)
            for r, row in enumerate(rows):
                ids[r, :len(row)] = torch.tensor(row)
                labels[r, :len(row)] = torch.tensor(row)
            loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)  # like the real Phi-2 / Vicuna repos, each LM ships its tokenizer
    return {"final_loss": round(loss.item(), 4), "params": sum(p.numel() for p in model.parameters()),
            "sequences": len(enc), "epochs": epochs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "factory" / "assets" / "microworld"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision-epochs", type=int, default=24)
    parser.add_argument("--lm-epochs", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=2000, help="size of the world the bases learn from")
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


def _build(args) -> dict:
    out = Path(args.out)
    start = time.time()
    report = {"seed": args.seed, "threads": args.threads, "train_images": args.train_images, "timings_s": {}}

    with tempfile.TemporaryDirectory() as tmp:
        # The bases learn from the training split of the world with data seed --seed (0 = the default world).
        world = generate_microworld(Path(tmp) / "world", seed=args.seed, num_train_images=args.train_images,
                                    num_eval_images=10, image_size=IMAGE_SIZE)
        # Captioned images from another seed, only to measure the tower's image → caption retrieval.
        heldout = generate_microworld(Path(tmp) / "heldout", seed=args.seed + 1000,
                                      num_train_images=min(200, args.train_images),
                                      num_eval_images=1, image_size=IMAGE_SIZE)
        pretrain = json.loads((world / "pretrain.json").read_text())
        instruct = json.loads((world / "instruct.json").read_text())
        captions = [e["conversations"][-1]["value"] for e in pretrain]

        t = time.time()
        corpus = captions + [chat_text(e["conversations"], eos) for e in pretrain + instruct for eos in EOS.values()]
        tokenizers = build_tokenizers(corpus + [SYSTEM + " USER: ASSISTANT:"])
        report["timings_s"]["tokenizer"] = round(time.time() - t, 1)
        report["tokenizer"] = {"vocab_size": len(tokenizers["phi"]),
                               "system_prompt_tokens": len(tokenizers["phi"](SYSTEM)["input_ids"])}

        t = time.time()
        report["vision"] = build_vision(world, heldout, tokenizers["phi"], out / "vision", args.seed,
                                        args.vision_epochs)
        report["timings_s"]["vision"] = round(time.time() - t, 1)

        for arch, eos in EOS.items():
            t = time.time()
            # Captions, the questions alone (nothing to go on: the LM learns the format and a flat prior) and the
            # questions after the caption in place of the image (it learns to answer from a description in context,
            # as real LLMs can, which is what a connector trained on captions in stage 1 can then feed it).
            texts = ([c + "\n" for c in captions] + [chat_text(e["conversations"], eos) for e in instruct]
                     + [chat_text(e["conversations"], eos, context=c) for e, c in zip(instruct, captions)])
            report[arch] = build_lm(arch, texts, tokenizers[arch], out / arch, args.seed, args.lm_epochs)
            report["timings_s"][arch] = round(time.time() - t, 1)

    report["timings_s"]["total"] = round(time.time() - start, 1)
    report["size_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    (out / "BUILD.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(main())
