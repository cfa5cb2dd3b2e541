"""collate: pad a list of dataset items into one batch.

Right padding is for training; left padding is for batched generation (every prompt then ends at the last column,
so the first generated token of every row is predicted from position T-1).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from factory.constants import IGNORE_INDEX
from factory.errors import FactoryError


def collate(batch: List[Optional[Dict]], pad_token_id: int, padding_side: str = "right") -> Dict:
    """-> {input_ids [B,T], labels [B,T] (IGNORE_INDEX on padding), attention_mask [B,T], pixel_values
    [n_img,3,H,W] (the images of the samples that have one, in batch order) or None, ids [B]}.

    None items (samples a dataset chose to drop) are left out. Items without `labels` (prompts for generation) get
    labels of IGNORE_INDEX.
    """
    if padding_side not in ("right", "left"):
        raise FactoryError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
    if pad_token_id is None:
        raise FactoryError("collate needs a pad_token_id; the tokenizer has no pad token. Pass e.g. the EOS or UNK "
                           "id (padding positions are masked out of attention and loss anyway).")
    items = [item for item in batch if item is not None]
    if not items:
        raise FactoryError("collate got a batch whose samples were all dropped; nothing to pad.")
    width = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), width), int(pad_token_id), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        ids = torch.as_tensor(item["input_ids"], dtype=torch.long)
        n = len(ids)
        span = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, span] = ids
        if item.get("labels") is not None:
            labels[row, span] = torch.as_tensor(item["labels"], dtype=torch.long)
        attention_mask[row, span] = 1
    images = [item["pixel_values"] for item in items if item.get("pixel_values") is not None]
    if images and len({tuple(image.shape) for image in images}) > 1:
        shapes = {str(item["id"]): tuple(item["pixel_values"].shape) for item in items
                  if item.get("pixel_values") is not None}
        raise FactoryError(f"Images in one batch must share a shape to be stacked; got {shapes}. The image "
                           f"transform must resize every image to the encoder's size.")
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": torch.stack(images) if images else None,
        "ids": [item.get("id") for item in items],
        # samples a dataset skipped as bad to produce these items (LlavaJsonDataset, data.on_bad_sample=skip)
        "bad_samples": [bad for item in items for bad in item.get("bad_samples") or ()],
    }
