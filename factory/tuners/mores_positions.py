"""Which layers and which token positions MoReS steers.

Two small parsers for the YAML options (`layers`, `positions`) and the function that turns the image mask of a batch
into explicit position tensors. Positions are always derived from where each sample's image tokens actually are
(never from a formula on the sequence length), so batches mixing image offsets, padding sides and text-only samples
are steered correctly.

Position specs (applied to one sample's candidate tokens, in sequence order):
  "f4+l5"      first 4 and last 5 candidates (the paper's default: 9 of 729 SigLIP tokens ≈ 1 %)
  "fN", "lM"   only the first N / last M
  "ratio=r"    k = max(1, round(r·n)) of the n candidates: the first ⌊k/2⌋ and the last ⌈k/2⌉ (so ratio=0.0123 of
               729 tokens is exactly f4+l5, and ratio=1.0 is every candidate)
  "all"        every candidate (= ratio=1.0)
Candidates are the image tokens for modality=vision (a sample without an image has none: nothing is steered), and the
text tokens of the prompt for modality=text (the ablation, `prompt_text_tokens`: attended non-image tokens that are
not trained answer tokens, so training and generation steer the same kind of token).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Sequence, Union

import torch

from factory.constants import IGNORE_INDEX
from factory.errors import FactoryError

_FL = re.compile(r"^(?:f(\d+))?\+?(?:l(\d+))?$")


@dataclass(frozen=True)
class PositionSpec:
    first: int = 0
    last: int = 0
    ratio: float = 0.0  # > 0 selects by ratio instead of first/last

    def count(self, n: int) -> tuple[int, int]:
        """(number taken from the front, number taken from the back) for a span of n candidates."""
        if n <= 0:
            return 0, 0
        if self.ratio > 0:
            k = min(n, max(1, round(self.ratio * n)))
            return k // 2, k - k // 2
        first, last = min(self.first, n), min(self.last, n)
        if first + last > n:  # short span: the two ends overlap, take every candidate once
            return n, 0
        return first, last


def parse_positions(spec: str) -> PositionSpec:
    """Parse `tuner.positions` ("f4+l5", "f3", "l2", "ratio=0.25", "all")."""
    text = str(spec).strip().lower().replace(" ", "")
    if text == "all":
        return PositionSpec(ratio=1.0)
    if text.startswith("ratio="):
        try:
            ratio = float(text.split("=", 1)[1])
        except ValueError:
            ratio = -1.0
        if not 0.0 < ratio <= 1.0:
            raise FactoryError(
                f"tuner.positions={spec!r} is not a valid ratio: write ratio=r with 0 < r <= 1 "
                f"(e.g. ratio=0.01 steers 1 % of the visual span)."
            )
        return PositionSpec(ratio=ratio)
    match = _FL.match(text)
    if text and match and (match.group(1) or match.group(2)):
        first, last = int(match.group(1) or 0), int(match.group(2) or 0)
        if first + last > 0:
            return PositionSpec(first=first, last=last)
    raise FactoryError(
        f"tuner.positions={spec!r} is not understood. Use 'fN+lM' (first N and last M tokens, e.g. f4+l5), 'fN', "
        f"'lM', 'ratio=r' (a share of the span, 0 < r <= 1) or 'all'."
    )


def parse_layers(spec: Union[str, int, Sequence[int], None], num_layers: int) -> List[int]:
    """Parse `tuner.layers` into sorted layer indices.

    Accepts "all" (default), a list of indices (negative ones count from the end), "every_2nd" / "every_3" style
    (layers 0, N, 2N, ...), and comma-separated ranges like "0-15" or "0-3,8,10-12" (inclusive).
    """
    def bad(why: str) -> FactoryError:
        return FactoryError(
            f"tuner.layers={spec!r} {why}. The LLM has {num_layers} decoder layers (0..{num_layers - 1}); use 'all', "
            f"a list like [0, 5, 9], 'every_2nd' (every 2nd layer from 0) or ranges like '0-15' / '0-3,8'."
        )

    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(range(num_layers))
    picked: List[int] = []
    if isinstance(spec, int):
        picked = [spec]
    elif isinstance(spec, str):
        text = spec.strip().lower().replace(" ", "")
        every = re.match(r"^every_?(\d+)(?:st|nd|rd|th)?$", text)
        if every:
            step = int(every.group(1))
            if step < 1:
                raise bad("has a step below 1")
            return list(range(0, num_layers, step))
        for part in text.split(","):
            rng = re.match(r"^(-?\d+)(?:-(\d+))?$", part)
            if not rng:
                raise bad(f"has an unreadable part {part!r}")
            lo = int(rng.group(1))
            hi = int(rng.group(2)) if rng.group(2) is not None else lo
            if rng.group(2) is not None and hi < lo:
                raise bad(f"has a descending range {part!r}")
            picked.extend(range(lo, hi + 1))
    else:
        try:
            picked = [int(x) for x in spec]
        except (TypeError, ValueError):
            raise bad("is neither a string nor a list of integers") from None
    resolved = sorted({i + num_layers if i < 0 else i for i in picked})
    if not resolved or resolved[0] < 0 or resolved[-1] >= num_layers:
        raise bad("selects a layer that does not exist")
    return resolved


def prompt_text_tokens(image_mask: torch.Tensor, attention_mask: torch.Tensor | None,
                       labels: torch.Tensor | None = None) -> torch.Tensor:
    """The text tokens of the prompt in this forward [B, T]: attended, not an image token and, when `labels` are
    given (training), not a trained answer token; none in a decode step of cached generation (the attention mask is
    longer than the input: every new token is generated). So modality=text steers the same tokens in training and
    in generation: the non-image tokens before the answer."""
    image_mask = image_mask.bool()
    if attention_mask is not None and attention_mask.shape[1] != image_mask.shape[1]:
        return torch.zeros_like(image_mask)
    attended = attention_mask.bool() if attention_mask is not None else torch.ones_like(image_mask)
    mask = attended & ~image_mask
    if labels is not None:
        mask &= labels == IGNORE_INDEX
    return mask


def select_positions(image_mask: torch.Tensor, attention_mask: torch.Tensor | None, spec: PositionSpec,
                     modality: str = "vision", labels: torch.Tensor | None = None) -> torch.Tensor:
    """Positions to steer per sample as a LongTensor [B, P], padded with -1 (P = max over the batch, may be 0).

    Runs on the masks' device without a Python loop over tokens: a cumulative count ranks every candidate within its
    sample, and a candidate is kept when its rank is among the first `f` or the last `l` of that sample.
    """
    image_mask = image_mask.bool()
    if modality == "vision":
        candidates = image_mask
    elif modality == "text":
        candidates = prompt_text_tokens(image_mask, attention_mask, labels)
    else:
        raise FactoryError(f"tuner.modality={modality!r} is not supported: use 'vision' (default) or 'text'.")
    batch, length = candidates.shape
    n = candidates.sum(dim=1)  # candidates per sample
    rank = candidates.long().cumsum(dim=1) - 1  # 0-based rank of each candidate within its sample
    front = torch.empty_like(n)
    back = torch.empty_like(n)
    for b, count in enumerate(n.tolist()):  # B small integers; the heavy work stays vectorised
        front[b], back[b] = spec.count(count)
    keep = candidates & ((rank < front[:, None]) | (rank >= (n - back)[:, None]))
    per_sample = keep.sum(dim=1)
    width = int(per_sample.max()) if batch else 0
    positions = torch.full((batch, width), -1, dtype=torch.long, device=candidates.device)
    if width:
        # stable sort puts the kept positions first, in sequence order
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
        slot = torch.arange(width, device=candidates.device)[None, :] < per_sample[:, None]
        positions = torch.where(slot, order, positions)
    return positions


# `tuner.positions_rule`: where the span that `positions` is applied to lies.
#   image_span      the image tokens of each sample (the factory's rule, the paper's intent);
#   llava_steering  what LLaVA-Steering's evaluation computed: a span as long as the image, starting
#                   `positions_offset` tokens after the image start (their start is the length of the prompt tokens
#                   minus the question's, which with Phi-2's tokenizer lands one token late: the trailing space of
#                   "USER: <image>\n{q} " is a token of its own), and fN+lM clipped to half the span each.
POSITION_RULES = ("image_span", "llava_steering")


def check_positions_rule(rule: str, spec: PositionSpec, modality: str) -> None:
    if rule not in POSITION_RULES:
        raise FactoryError(f"tuner.positions_rule={rule!r} is not supported: use one of {', '.join(POSITION_RULES)}.")
    if rule == "llava_steering" and (spec.ratio > 0 or modality != "vision"):
        raise FactoryError(
            "tuner.positions_rule=llava_steering reproduces LLaVA-Steering's visual positions: it takes "
            "tuner.positions of the form fN+lM, fN or lM and tuner.modality=vision (their `uniform` and text rules "
            "are not supported). Use positions_rule=image_span for ratio=/all positions or the text modality."
        )


def select_positions_llava_steering(image_mask: torch.Tensor, spec: PositionSpec, offset: int) -> torch.Tensor:
    """Positions [B, P] (-1 = padding) of the llava_steering rule: n = the sample's image-token count, the window
    [s + offset, s + offset + n) with s its first image token, its first min(n // 2, f) and last min(n // 2, l)
    positions (LLaVA-Steering's clipping), positions past the end of the sequence dropped."""
    image_mask = image_mask.bool()
    batch, length = image_mask.shape
    rows = []
    for b in range(batch):  # B small integers; the masks stay on their device
        where = image_mask[b].nonzero().flatten()
        if where.numel() == 0:
            rows.append([])
            continue
        n, start = int(where.numel()), int(where[0]) + offset
        first, last = min(n // 2, spec.first), min(n // 2, spec.last)
        picked = list(range(first)) + list(range(n - last, n))
        rows.append([start + i for i in picked if 0 <= start + i < length])
    width = max((len(r) for r in rows), default=0)
    positions = torch.full((batch, width), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        positions[b, :len(row)] = torch.tensor(row, dtype=torch.long)
    return positions.to(image_mask.device)


def expected_count(spec: PositionSpec, n: int) -> int:
    """How many positions a span of n candidates yields (for docs and tests)."""
    front, back = spec.count(n)
    return front + back


__all__ = ["PositionSpec", "parse_positions", "parse_layers", "select_positions", "expected_count", "POSITION_RULES",
           "check_positions_rule", "select_positions_llava_steering"]
