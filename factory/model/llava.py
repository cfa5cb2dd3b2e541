"""LlavaModel: vision encoder → connector → LLM, with image tokens expanded at tokenization.

`input_ids` carry exactly `image_token_count` copies of IMAGE_TOKEN_INDEX per image. The model embeds
`input_ids.clamp(min=0)` with the LLM's own (never resized) embedding and overwrites the image positions with the
connector outputs: image k of the batch fills the k-th run of placeholders, in reading order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from factory.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from factory.errors import FactoryError
from factory.model.hf_cache import cache_argument, output_cache


@dataclass
class LlavaOutput(ModelOutput):
    """LlavaModel's output. `cache` is the LLM's KV cache, named as transformers ≥ 5.24 names it on every
    supported version (pass it back as `cache=` for the next decode step)."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    cache: Any = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None


def positions_from_mask(attention_mask: torch.Tensor, length: int) -> torch.LongTensor:
    """Position ids of the last `length` columns: real tokens count 0, 1, 2 … from the first unmasked one, so a
    left-padded sample gets the same positions as the unpadded one (padding positions are clamped to 0)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -length:]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the label tokens, in fp32.

    Only positions with a label are upcast (the full fp32 logits of a 51k vocabulary would not fit in memory). A
    batch without label tokens gives a zero that still back-propagates (every rank must run backward)."""
    shift_labels = labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[:, :-1][keep].float(), shift_labels[keep], reduction="sum")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's label tokens, in fp32."""
    count = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return token_loss_sum(logits, labels) / max(count, 1)


class LlavaModel(nn.Module):
    def __init__(self, vision: nn.Module, connector: nn.Module, llm: nn.Module, tokenizer: Any = None,
                 template: Optional[str] = None, config: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.tokenizer = tokenizer
        self.template = template
        self.config = config or {}
        self.image_token_count = int(vision.num_tokens)
        # Objects with observe_batch(image_mask, attention_mask, labels), called before every LLM call (MoReS
        # positions; labels is None outside training).
        self.batch_observers: List[Any] = []

    # ------------------------------------------------------------------ embedding
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_images, 3, H, W] → connector outputs [n_images, N, D]. The vision tower runs without autograd when
        none of its parameters is trained (no activations kept, no backward through it)."""
        if any(p.requires_grad for p in self.vision.parameters()):
            features = self.vision.encode(pixel_values)
        else:
            with torch.no_grad():
                features = self.vision.encode(pixel_values)
        connector_dtype = next(iter(self.connector.parameters()), features).dtype
        return self.connector(features.to(connector_dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """inputs_embeds [B, T, D]: token embeddings with the image spans replaced by the connector outputs."""
        embedding = self.llm.get_input_embeddings()
        embeds = embedding(input_ids.clamp(min=0))
        image_mask = input_ids == IMAGE_TOKEN_INDEX
        num_positions = int(image_mask.sum())
        num_images = 0 if pixel_values is None else int(pixel_values.shape[0])
        expected = num_images * self.image_token_count
        if num_positions != expected:
            raise FactoryError(
                f"The batch has {num_positions} image-token positions (id {IMAGE_TOKEN_INDEX}) but {num_images} "
                f"image(s) × {self.image_token_count} tokens = {expected} are needed. Each `<image>` must expand to "
                f"exactly {self.image_token_count} tokens (the vision encoder's num_tokens) and every such span "
                "needs its image in pixel_values; re-tokenize the data with this model's vision config."
            )
        if num_images == 0:
            return embeds
        features = self.encode_images(pixel_values).to(embeds.dtype)
        # masked_scatter fills the masked positions in row-major order: image k → k-th run of placeholders.
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features.reshape(-1, features.shape[-1]))

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, cache: Any = None, use_cache: bool = False,
                output_attentions: bool = False) -> LlavaOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs_embeds = self.embed(input_ids, pixel_values)
        image_mask = input_ids == IMAGE_TOKEN_INDEX
        for observer in self.batch_observers:
            observer.observe_batch(image_mask=image_mask, attention_mask=attention_mask, labels=labels)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, input_ids.shape[1])
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=use_cache, output_attentions=output_attentions, return_dict=True,
                       **{cache_argument(self.llm): cache})
        loss = causal_lm_loss(out.logits, labels) if labels is not None else None
        return LlavaOutput(loss=loss, logits=out.logits, cache=output_cache(out), attentions=out.attentions)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 pixel_values: Optional[torch.Tensor] = None, max_new_tokens: int = 32,
                 eos_token_id: Union[int, Sequence[int], None] = None) -> List[List[int]]:
        """Batched greedy decoding with a KV cache. Returns the new token ids of each sample, without the eos token
        that ended it. Prompts may be left- or right-padded (right padding is moved to the left first)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = left_align(input_ids, attention_mask)
        if eos_token_id is None and self.tokenizer is not None:
            eos_token_id = self.tokenizer.eos_token_id
        eos = {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in (eos_token_id or [])}
        was_training = self.training
        self.eval()
        try:
            batch = input_ids.shape[0]
            generated: List[List[int]] = [[] for _ in range(batch)]
            finished = [False] * batch
            out = self.forward(input_ids, attention_mask, pixel_values, use_cache=True)
            for step in range(max_new_tokens):
                next_tokens = out.logits[:, -1].argmax(-1)
                for i, token in enumerate(next_tokens.tolist()):
                    if finished[i]:
                        continue
                    if token in eos:
                        finished[i] = True
                    else:
                        generated[i].append(token)
                if all(finished) or step == max_new_tokens - 1:
                    break
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
                out = self.forward(next_tokens[:, None], attention_mask, cache=out.cache, use_cache=True)
        finally:
            self.train(was_training)
        return generated

    # ------------------------------------------------------------------ checkpoints
    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """The parameters that require grad (connector, tuner weights …), detached, by their module path."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> None:
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        missing = sorted(set(params) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(params))
        if missing or unexpected:
            raise FactoryError(
                "The trainable weights do not match this model's trainable parameters "
                f"(missing: {_short(missing)}; unexpected: {_short(unexpected)}). The checkpoint was saved with a "
                "different tuner, connector or model; rebuild the model with the checkpoint's config.yaml."
            )
        bad = [f"{n} {tuple(state_dict[n].shape)} vs {tuple(p.shape)}" for n, p in params.items()
               if tuple(state_dict[n].shape) != tuple(p.shape)]
        if bad:
            raise FactoryError(f"Trainable weights have the wrong shapes: {_short(bad)}. Use the matching config.")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state_dict[name].to(device=p.device, dtype=p.dtype))

    def activation_checkpointing_enable(self) -> None:
        """Recompute LLM activations in backward (the LLM holds nearly all activation memory)."""
        enable_activation_checkpointing(self.llm)
        if hasattr(self.llm, "enable_input_require_grads"):
            # with a frozen embedding the checkpointed blocks would otherwise see inputs without grad
            self.llm.enable_input_require_grads()


def enable_activation_checkpointing(causal_lm: nn.Module) -> None:
    """Non-reentrant activation checkpointing of a Hugging Face model (or a PEFT wrapper of one). transformers 5.24
    names it `activation_checkpointing_enable` and warns that the old name, `gradient_checkpointing_enable`, goes
    away in v6; older 5.x releases know only the old name, so the model's own method is looked up."""
    options = {"use_reentrant": False}
    enable = getattr(causal_lm, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=options)
    else:
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Move padding to the left of each row (generation appends tokens on the right)."""
    mask = attention_mask.bool()
    if not bool((mask[:, :-1] & ~mask[:, 1:]).any()):  # no row has a real token after a pad: already left-aligned
        return input_ids, attention_mask
    # a stable sort on "is real" puts pads first while keeping the token order
    order = torch.sort(mask.long(), dim=1, stable=True).indices
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def _short(names: Sequence[str], limit: int = 6) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" … ({len(names)} in all)" if len(names) > limit else "")
