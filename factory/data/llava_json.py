"""LlavaJsonDataset: LLaVA-1.5 JSON / JSONL conversations + an image folder → token ids, labels and pixels.

Entries look like ``{"id": ..., "image": "rel/path.png" (optional), "conversations": [{"from": "human",
"value": "<image>\\nq"}, {"from": "gpt", "value": "a"}, ...]}``. The file is either one JSON list or JSONL (one
object per line). Everything that can be checked without tokenizing is checked when the dataset is built, so a bad
file fails at once with its file + line / entry + id instead of hours into training; image files are only checked
for existence there (one os.path call each) and decoded lazily, where a corrupt one raises a FactoryError naming it.

Tokenization is lazy (per __getitem__), which keeps start-up instant on 665k-sample files. A sample whose image
span would be cut by `max_length` is **skipped by substitution**: `__getitem__` logs one warning for it, counts it
in `num_skipped` (per process: each DataLoader worker counts its own) and returns the next sample that fits
instead. Substitution keeps every micro-batch full, so batch shapes, gradient accumulation and the step count stay
identical on every rank (dropping rows could leave one rank with an empty batch and hang the others). Text-only
samples that are too long are simply truncated.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Dict, List, Optional, Union

import torch

from factory.data.templates import Template, conversation_problem, get_template
from factory.errors import FactoryError

logger = logging.getLogger(__name__)

# Rough characters per token of English BPE/SentencePiece text; only used for length-grouping estimates.
_CHARS_PER_TOKEN = 4


def read_entries(json_path: str) -> List[tuple]:
    """[(where, entry)] from a JSON list or a JSONL file; `where` names the file and line / entry for messages."""
    if not os.path.isfile(json_path):
        raise FactoryError(f"The data file {json_path} does not exist. Check the data config's `json` path "
                           f"(relative paths are resolved from the current directory).")
    with open(json_path, "r", encoding="utf-8-sig") as handle:
        text = handle.read()
    if text.lstrip().startswith("["):  # one JSON list
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise FactoryError(
                f"{json_path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}. Fix the file "
                f"(a LLaVA data file is one JSON list of entries, or JSONL with one entry per line)."
            ) from None
        return [(f"{json_path}, entry {i}", entry) for i, entry in enumerate(data)]
    entries = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append((f"{json_path}, line {lineno}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise FactoryError(
                f"{json_path}, line {lineno} is not valid JSON: {err.msg} at column {err.colno}. Each line of a "
                f"JSONL data file must be one complete JSON object (or use a .json file holding one list)."
            ) from None
    return entries


def entry_problem(entry) -> Optional[str]:
    """Why `entry` is not a valid LLaVA sample, or None."""
    if not isinstance(entry, dict):
        return f"an entry must be a JSON object, got {type(entry).__name__}"
    missing = [key for key in ("id", "conversations") if key not in entry]
    if missing:
        return f"missing key(s) {', '.join(repr(k) for k in missing)} (an entry needs `id` and `conversations`)"
    image = entry.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        return f"`image` must be a relative file path string, got {image!r}"
    return conversation_problem(entry["conversations"], has_image=image is not None)


class LlavaJsonDataset(torch.utils.data.Dataset):
    """Map-style dataset of LLaVA conversations; items are
    ``{id, input_ids: LongTensor[T], labels: LongTensor[T], pixel_values: FloatTensor[3,H,W] | None}``."""

    def __init__(self, json_path: str, image_folder: Optional[str], tokenizer,
                 template: Union[str, Template], image_transform: Optional[Callable],
                 num_image_tokens: int, max_length: Optional[int] = None):
        self.json_path = str(json_path)
        self.image_folder = None if image_folder is None else str(image_folder)
        self.tokenizer = tokenizer
        self.template = get_template(template) if isinstance(template, str) else template
        self.image_transform = image_transform
        self.num_image_tokens = int(num_image_tokens)
        self.max_length = max_length
        self.entries: List[Dict] = []
        self._where: List[str] = []
        self._skipped: set = set()

        for where, entry in read_entries(self.json_path):
            problem = entry_problem(entry)
            if problem:
                sample = f" (id {entry['id']!r})" if isinstance(entry, dict) and "id" in entry else ""
                raise FactoryError(f"{where}{sample}: {problem}. Fix or remove this entry.")
            self.entries.append(entry)
            self._where.append(where)
        if not self.entries:
            raise FactoryError(f"{self.json_path} holds no samples. Point the data config at a file with at least "
                               f"one LLaVA entry (or regenerate the data).")
        self.has_image: List[bool] = [entry.get("image") is not None for entry in self.entries]
        self._check_images()
        if max_length is not None and any(self.has_image) and max_length <= self.num_image_tokens:
            raise FactoryError(
                f"max_length={max_length} cannot hold an image of {self.num_image_tokens} tokens plus text, so every "
                f"image sample of {self.json_path} would be skipped. Raise trainer.max_length."
            )
        self.lengths: List[int] = self._estimate_lengths()

    def _estimate_lengths(self) -> List[int]:
        """Cheap token-count estimates for a length-grouped sampler: the template's own tokens (system prompt, role
        names, end tokens; measured once on empty turns) + characters / 4 + the image tokens. No per-sample
        tokenization, so it stays instant on 665k samples."""
        def overhead(num_rounds: int) -> int:
            empty = [{"from": role, "value": ""} for _ in range(num_rounds) for role in ("human", "gpt")]
            try:
                return len(self.template.encode(empty, self.tokenizer, self.num_image_tokens).input_ids)
            except FactoryError:  # e.g. 'plain' takes one round only
                return len(self.template.encode(empty[:2], self.tokenizer, self.num_image_tokens).input_ids)

        first = overhead(1)
        per_round = max(0, overhead(2) - first)
        return [
            first + per_round * (len(entry["conversations"]) // 2 - 1)
            + sum(len(turn["value"]) for turn in entry["conversations"]
                  if turn["from"] == "gpt" or getattr(self.template, "encodes_human_text", True)) // _CHARS_PER_TOKEN
            + (self.num_image_tokens if has_image else 0)
            for entry, has_image in zip(self.entries, self.has_image)
        ]

    def _check_images(self) -> None:
        if not any(self.has_image):
            return
        if self.image_folder is None:
            first = self.has_image.index(True)
            raise FactoryError(f"{self._where[first]} (id {self.entries[first]['id']!r}) has an image but no "
                               f"image_folder was given. Set the data config's `image_folder`.")
        if self.image_transform is None:
            raise FactoryError(f"{self.json_path} has image samples but no image transform was given (the vision "
                               f"encoder's `image_transform`).")
        missing = [i for i, has in enumerate(self.has_image) if has and not os.path.isfile(self.image_path(i))]
        if missing:
            first = missing[0]
            raise FactoryError(
                f"Image {self.image_path(first)} of sample id {self.entries[first]['id']!r} ({self._where[first]}) "
                f"does not exist; {len(missing)} of the {sum(self.has_image)} images referenced by {self.json_path} "
                f"are missing. Check the data config's `image_folder` ({self.image_folder}) or fetch the images."
            )

    def image_path(self, index: int) -> str:
        return os.path.join(self.image_folder or "", self.entries[index]["image"])

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def num_skipped(self) -> int:
        """Samples skipped (in this process) because max_length would cut their image span."""
        return len(self._skipped)

    def load_image(self, index: int) -> torch.Tensor:
        from PIL import Image

        path = self.image_path(index)
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except Exception as err:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError ...)
            raise FactoryError(
                f"Cannot read image {path} of sample id {self.entries[index]['id']!r} ({self._where[index]}): "
                f"{type(err).__name__}: {err}. Replace the file or remove the sample."
            ) from None
        return self.image_transform(image)

    def encode(self, index: int) -> Optional[Dict]:
        """The item at `index`, or None when max_length would cut its image span (no substitution, no counting)."""
        entry = self.entries[index]
        try:
            encoded = self.template.encode(entry["conversations"], self.tokenizer, self.num_image_tokens,
                                           self.max_length)
        except FactoryError as err:
            raise FactoryError(f"{self._where[index]} (id {entry['id']!r}): {err}") from None
        if encoded.truncated_image:
            return None
        return {
            "id": entry["id"],
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
            "pixel_values": self.load_image(index) if self.has_image[index] else None,
        }

    def __getitem__(self, index: int) -> Dict:
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            item = self.encode(candidate)
            if item is not None:
                return item
            if candidate not in self._skipped:
                self._skipped.add(candidate)
                logger.warning(
                    "Skipping sample id %r (%s): with max_length=%s the truncation would cut its %d image tokens; "
                    "it is replaced by the next sample that fits (%d skipped so far). Raise trainer.max_length to "
                    "keep it.", self.entries[candidate]["id"], self._where[candidate], self.max_length,
                    self.num_image_tokens, len(self._skipped))
        raise FactoryError(
            f"Every sample of {self.json_path} is longer than max_length={self.max_length} before its image ends, so "
            f"none can be trained on. Raise trainer.max_length."
        )
