"""Modality imbalance: how much attention the generated answer gives to visual vs text tokens, layer by layer.

For each sample: generate the answer greedily, then run ONE forward pass over prompt + answer with attention weights
(eager attention for this pass only; the model's attention implementation is restored afterwards). Queries are the
generated answer tokens (the rows a KV-cache decode feeds in; the stop token is not part of the answer). Per layer,
heads averaged:

* α_image = mean over queries of the mean attention weight per visual token,
* α_text  = mean over queries of the mean attention weight per text token,
* LMAR_l  = (1/N) Σ_i α_image,i / α_text,i   (a mean of per-sample ratios; PAPER §6),
* visual_share_l = mean over samples and queries of the total attention mass on visual tokens (rows sum to 1, the
  rest goes to text, BOS and earlier answer tokens), with text_share_l likewise.

What counts as *text* is the ``text_tokens`` option:

* ``prompt`` (default): every prompt token that is not an image token, not the BOS token(s) and not padding, i.e.
  the system prompt, the role markers ("USER:", "ASSISTANT:") and the question;
* ``prompt_with_bos``: the same plus BOS (BOS is an attention sink that takes much of the mass in most LLMs);
* ``prompt_and_answer``: ``prompt`` plus the answer tokens each query can see (itself and the earlier ones).

LMAR ≈ 1 means a visual token gets as much attention as a text token on average.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from tqdm import tqdm

from factory.constants import IMAGE_TOKEN_INDEX
from factory.data.templates import tokenizer_facts
from factory.errors import FactoryError
from factory.eval.generate import batched, conversation_for, generate_ids, prepare_batch
from factory.model.loading import module_device

TEXT_TOKEN_MODES = ("prompt", "prompt_with_bos", "prompt_and_answer")


# ------------------------------------------------------------------------------------------------ the math
def key_masks(input_ids: torch.Tensor, prompt_length: int, num_bos: int, text_tokens: str = "prompt"):
    """Masks for one unpadded sequence (prompt followed by the answer tokens).

    Returns (query_positions [Q], image_keys [Q, T] bool, text_keys [Q, T] bool): row q lists the keys that count as
    visual / text for the q-th answer token (identical rows except with ``prompt_and_answer``).
    """
    if text_tokens not in TEXT_TOKEN_MODES:
        raise FactoryError(f"analysis text_tokens={text_tokens!r} is unknown; use one of {', '.join(TEXT_TOKEN_MODES)}.")
    length = int(input_ids.shape[0])
    positions = torch.arange(length)
    queries = positions[prompt_length:]
    is_image = input_ids == IMAGE_TOKEN_INDEX
    in_prompt = positions < prompt_length
    is_bos = positions < num_bos
    text = in_prompt & ~is_image & (~is_bos if text_tokens != "prompt_with_bos" else torch.ones_like(is_bos))
    text_rows = text.unsqueeze(0).expand(len(queries), length).clone()
    if text_tokens == "prompt_and_answer":
        visible_answer = (positions.unsqueeze(0) <= queries.unsqueeze(1)) & ~in_prompt.unsqueeze(0)
        text_rows |= visible_answer
    image_rows = is_image.unsqueeze(0).expand(len(queries), length)
    return queries, image_rows, text_rows


def layer_statistics(attentions: Sequence[torch.Tensor], queries: torch.Tensor, image_keys: torch.Tensor,
                     text_keys: torch.Tensor) -> Dict[str, List[float]]:
    """Per-layer α_image, α_text, ratio, visual and text shares for ONE sample.

    attentions: one tensor per layer, [H, T, T] or [1, H, T, T] (softmax weights, rows = queries).
    """
    out: Dict[str, List[float]] = {k: [] for k in ("alpha_image", "alpha_text", "ratio", "visual_share",
                                                    "text_share")}
    img = image_keys.float()
    txt = text_keys.float()
    for layer in attentions:
        weights = layer[0] if layer.dim() == 4 else layer
        rows = weights.float().mean(0)[queries]                                  # heads averaged: [Q, T]
        image_mass = (rows * img).sum(-1)                                        # [Q]
        text_mass = (rows * txt).sum(-1)
        alpha_image = (image_mass / img.sum(-1)).mean().item()                  # mean per visual token
        alpha_text = (text_mass / txt.sum(-1)).mean().item()                    # mean per text token
        out["alpha_image"].append(alpha_image)
        out["alpha_text"].append(alpha_text)
        out["ratio"].append(alpha_image / alpha_text if alpha_text > 0 else math.inf)
        out["visual_share"].append(image_mass.mean().item())
        out["text_share"].append(text_mass.mean().item())
    return out


def aggregate(samples: Sequence[Dict[str, List[float]]]) -> Dict[str, List[float]]:
    """LMAR_l = mean over samples of the per-sample ratios; every other statistic averaged the same way."""
    if not samples:
        raise FactoryError("The imbalance analysis has no usable sample (every question was text-only or got an "
                           "empty answer). Use a question file with images and raise max_new_tokens.")
    tensor = {k: torch.tensor([s[k] for s in samples], dtype=torch.float64) for k in samples[0]}
    ratio = tensor["ratio"]
    return {
        "lmar": ratio.mean(0).tolist(),
        "lmar_std": (ratio.std(0, unbiased=False) if len(samples) > 1 else torch.zeros_like(ratio[0])).tolist(),
        "lmar_median": ratio.median(0).values.tolist(),
        "alpha_image": tensor["alpha_image"].mean(0).tolist(),
        "alpha_text": tensor["alpha_text"].mean(0).tolist(),
        "visual_share": tensor["visual_share"].mean(0).tolist(),
        "text_share": tensor["text_share"].mean(0).tolist(),
    }


# ------------------------------------------------------------------------------------------------ the model side
def _base_llm(model):
    llm = model.llm
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


@contextlib.contextmanager
def eager_attention(model) -> Iterator[None]:
    """Switch the LLM to eager attention (the only implementation that returns weights), then restore it."""
    base = _base_llm(model)
    previous = getattr(base.config, "_attn_implementation", None)
    switch = previous != "eager"
    if switch:
        base.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch and previous is not None:
            base.set_attn_implementation(previous)


def count_bos(model, prompt_ids: Sequence[int]) -> int:
    bos = tokenizer_facts(model.tokenizer).bos_ids
    return len(bos) if bos and list(prompt_ids[: len(bos)]) == list(bos) else 0


@torch.no_grad()
def analyze_sample(model, prompt_ids: List[int], answer_ids: List[int], pixel_values: Optional[torch.Tensor],
                   text_tokens: str = "prompt") -> Optional[Dict[str, List[float]]]:
    """Per-layer statistics of one sample, or None when it cannot be measured (no image or empty answer)."""
    if not answer_ids or IMAGE_TOKEN_INDEX not in prompt_ids:
        return None
    device = module_device(model)
    ids = torch.tensor(prompt_ids + list(answer_ids), dtype=torch.long)
    with eager_attention(model):
        out = model(ids[None].to(device), torch.ones(1, len(ids), dtype=torch.long, device=device),
                    pixel_values, output_attentions=True)
    if not out.attentions:
        raise FactoryError("The model returned no attention weights even with eager attention; this LLM does not "
                           "support output_attentions, so the imbalance analysis cannot run on it.")
    queries, image_keys, text_keys = key_masks(ids, len(prompt_ids), count_bos(model, prompt_ids), text_tokens)
    return layer_statistics([a.cpu() for a in out.attentions], queries, image_keys, text_keys)


def analyze(model, questions: Sequence[Dict[str, Any]], image_folder: Optional[Path], num_samples: int = 100,
            max_new_tokens: int = 16, text_tokens: str = "prompt", batch_size: int = 8, label: str = "model",
            progress: bool = True) -> Dict[str, Any]:
    """Generate answers for the first `num_samples` image questions and measure LMAR / visual share per layer."""
    if text_tokens not in TEXT_TOKEN_MODES:
        raise FactoryError(f"analysis text_tokens={text_tokens!r} is unknown; use one of {', '.join(TEXT_TOKEN_MODES)}.")
    chosen = [q for q in questions if q.get("image")][: int(num_samples)]
    if not chosen:
        raise FactoryError("The question file has no question with an image; the imbalance analysis needs images.")
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    per_sample, skipped_empty = [], 0
    chunks = batched(chosen, batch_size)
    if progress:
        chunks = tqdm(chunks, total=-(-len(chosen) // batch_size), desc="imbalance", unit="batch")
    try:
        for chunk in chunks:
            batch = prepare_batch(model, [conversation_for(q) for q in chunk], [q["image"] for q in chunk],
                                  image_folder)
            answers = generate_ids(model, batch, max_new_tokens)
            for i, answer in enumerate(answers):
                prompt = batch["input_ids"][i, -batch["prompt_lengths"][i]:].tolist()
                stats = analyze_sample(model, prompt, answer, batch["pixel_values"][i:i + 1], text_tokens)
                if stats is None:
                    skipped_empty += 1
                else:
                    per_sample.append(stats)
    finally:
        model.train(was_training)
    result = {"label": label, "n_samples": len(per_sample), "skipped_empty_answer": skipped_empty,
              "num_layers": len(per_sample[0]["ratio"]) if per_sample else 0, "text_tokens": text_tokens,
              "queries": "generated answer tokens (stop token excluded)", "heads": "averaged",
              **aggregate(per_sample), "seconds": round(time.perf_counter() - start, 3)}
    return result


def write_results(result: Dict[str, Any], out_json: Path) -> Path:
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    return out_json

