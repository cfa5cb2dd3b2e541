"""Train a candidate micro-world LM on freshly generated text and measure how well it reads a caption in context.

    python scripts/microworld_lm_reading.py --out /tmp/lm [--arch phi|llama] [--width 128] [--layers 4] [--heads 4]
        [--minutes 10 | --steps N] [--lr 1e-3] [--batch 32] [--turns 8] [--copy 0.2] [--no-caption 0.15]
        [--min-objects 1] [--eval-every 500] [--threads 1] [--seed 0]

The experiment bench for the bases' rebuild (docs/microworld.md, "Rebuilding the bases"): which size and recipe gets
an LM from scratch to answer held-out questions from the caption written where the image would be. Every step
draws new scenes (a synthetic world has unlimited text): one conversation per scene with `--turns` questions, the
scene's caption in front of the first (or nothing, with probability `--no-caption`, so that the answer prior stays
flat), optionally opened by a "Repeat the description." turn (`--copy`: a copy task, which trains the same
previous-token + match circuit the lookups need). Sequences are the chat template's own ids and labels (loss on
the answers and their end token only). AdamW, linear warmup over 5 % of the steps, cosine decay to zero; with
`--minutes` the step count is set from the speed of the first 20 steps.

Every `--eval-every` steps and at the end it prints the greedy accuracy per question type on the 500 held-out
questions of the default world with the caption in context (scripts/microworld_check.py's measure) and, at the
end, without it; the last stdout line is one JSON object. The model and the tokenizer are saved in --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from factory.data import microworld as mw  # noqa: E402
from factory.data.templates import get_template  # noqa: E402
from microworld_check import LM_TEMPLATES, lm_reading  # noqa: E402

TOKENIZER = REPO / "factory" / "assets" / "microworld"  # the shipped vocabulary: every world word is one token
COPY_PROMPT = "Repeat the description."


def conversation(rng: random.Random, args) -> list:
    """One scene's conversation: caption (or nothing) + `turns` questions, optionally a copy turn first."""
    scene = mw._random_scene(rng, rng.randint(args.min_objects, len(mw.POSITIONS)))
    context = mw.caption(scene) + "\n" if rng.random() >= args.no_caption else ""
    turns = []
    if context and rng.random() < args.copy:
        turns.append((context + COPY_PROMPT, mw.caption(scene)))
        context = ""
    # A question type first, then one of its templates: each type gets a fifth of the questions (a uniform pick
    # over the templates would give position, with one template, a seventh).
    by_type = {t: [key for key, qt, _ in mw.TEMPLATES if qt == t] for t in mw.QUESTION_TYPES}
    while len(turns) < args.turns + (1 if turns else 0):
        qa = mw._question(scene, rng.choice(by_type[rng.choice(mw.QUESTION_TYPES)]), rng)
        if qa:
            turns.append((context + qa[0], qa[1]))
            context = ""
    conv = []
    for question, answer in turns:
        conv += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return conv


def batch(rng, args, template, tok):
    rows = [template.encode(conversation(rng, args), tok, 0) for _ in range(args.batch)]
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r.input_ids), torch.tensor(r.labels), 1
    return ids, labels, mask


def build_model(args, tok):
    from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

    special = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    shape = dict(hidden_size=args.width, intermediate_size=4 * args.width, num_hidden_layers=args.layers,
                 num_attention_heads=args.heads, max_position_embeddings=512)
    if args.arch == "phi":
        return PhiForCausalLM(PhiConfig(**shape, **special, partial_rotary_factor=0.5))
    return LlamaForCausalLM(LlamaConfig(**shape, **special, num_key_value_heads=args.heads))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--arch", choices=sorted(LM_TEMPLATES), default="phi")
    parser.add_argument("--tokenizer", default=str(TOKENIZER),
                        help="folder holding the phi/ and llama/ tokenizers (default: the shipped ones)")
    for name, value in (("width", 128), ("layers", 4), ("heads", 4), ("batch", 32), ("turns", 8),
                        ("min-objects", 1), ("eval-every", 500), ("threads", 1), ("seed", 0), ("steps", 0),
                        ("eval-questions", 500)):
        parser.add_argument(f"--{name}", type=int, default=value)
    for name, value in (("minutes", 0.0), ("lr", 1e-3), ("copy", 0.2), ("no-caption", 0.15)):
        parser.add_argument(f"--{name}", type=float, default=value)
    args = parser.parse_args(argv)
    if bool(args.steps) == bool(args.minutes):
        parser.error("give exactly one of --steps and --minutes")
    return args


def train(args: argparse.Namespace) -> dict:
    """Train, measure and save one LM as `args` say (parse_args); returns the report (scripts/build_microworld.py
    builds the shipped LMs with this)."""
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(f"lm-reading-{args.seed}")  # its own stream: never the default world's eval scenes
    tok = AutoTokenizer.from_pretrained(Path(args.tokenizer) / args.arch)
    template = get_template(LM_TEMPLATES[args.arch])
    model = build_model(args, tok)
    model.generation_config.pad_token_id = tok.pad_token_id  # batched generation pads with the tokenizer's pad
    with tempfile.TemporaryDirectory() as tmp:
        world = mw.generate_microworld(Path(tmp) / "w", seed=0, num_train_images=1, num_pope_images=0,
                                       num_eval_images=args.eval_questions)
        held_out = json.loads((world / "eval.json").read_text())

    def measure(with_caption: bool) -> dict:
        model.eval()
        out = Path(args.out)
        model.save_pretrained(out, safe_serialization=True)
        if out.resolve() != (Path(args.tokenizer) / args.arch).resolve():  # the build trains in the tokenizer's folder
            tok.save_pretrained(out)
        result = lm_reading(out, LM_TEMPLATES[args.arch], held_out, with_caption)
        model.train()
        return result

    steps = args.steps or 10 ** 9
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    lr_at = lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s))
    start, history, step = time.time(), [], 0
    model.train()
    while step < steps:
        step += 1
        ids, labels, mask = batch(rng, args, template, tok)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step == 20 and args.minutes:
            steps = max(21, int(20 / (time.time() - start) * args.minutes * 60))
        if step % args.eval_every == 0 and step < steps:
            history.append({"step": step, "seconds": round(time.time() - start), "loss": round(loss.item(), 4),
                            "caption": measure(True)})
            print(json.dumps(history[-1]), flush=True)
    report = {"settings": vars(args), "steps": step, "train_seconds": round(time.time() - start, 1),
              "params": sum(p.numel() for p in model.parameters()), "final_loss": round(loss.item(), 4),
              "history": history, "lm_caption_accuracy": measure(True), "lm_no_caption_accuracy": measure(False)}
    return report


def main(argv=None) -> int:
    print(json.dumps(train(parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
