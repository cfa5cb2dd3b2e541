"""LlavaJsonDataset: LLaVA-1.5 JSON / JSONL conversations + an image folder → token ids, labels and pixels.

Entries look like ``{"id": ..., "image": "rel/path.png" (optional), "conversations": [{"from": "human",
"value": "<image>\\nq"}, {"from": "gpt", "value": "a"}, ...]}``. The file is either one JSON list or JSONL (one
object per line). Everything that can be checked without tokenizing is checked when the dataset is built, so a bad
file fails at once with its file + line / entry + id instead of hours into training; image files are only checked
for existence and for lying inside `image_folder` there (a few os.path calls each) and decoded lazily, through
factory.data.images.open_image (16-bit images scaled, decompression bombs and extreme aspect ratios refused).

Bad samples met mid-run (an unreadable image, text the tokenizer cannot encode such as a lone surrogate) follow
`on_bad_sample`: "error" raises one FactoryError naming file, entry and id; "skip" logs the same message as a warning
and substitutes the next good sample, exactly like the max_length skip below. An item lists the bad samples
skipped to produce it (`bad_samples`, present only when there were some; collate carries them), so the training
loop counts them across DataLoader workers and ranks. Each process (or DataLoader worker) stops the run once more
than `max_bad_fraction` of the samples it has seen are bad (`too_many_bad`), so data that is broken throughout fails
in seconds instead of logging a warning per sample for hours.

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

from factory.data.images import DEFAULT_MAX_ASPECT_RATIO, open_image, resolve_in_folder
from factory.data.templates import Template, conversation_problem, encode_conversation, get_template
from factory.errors import FactoryError
from factory.text_files import read_utf8, surrogate_problem  # read_utf8: re-exported for callers

logger = logging.getLogger(__name__)

ON_BAD_SAMPLE = ("error", "skip")


class BadSampleError(FactoryError):
    """One sample that cannot be used (its message names file, entry and id); `on_bad_sample` decides its fate."""


# The bad fraction is judged once this many samples have been seen: two corrupt files among a run's first few
# samples say nothing about the other 665k.
MIN_SEEN_FOR_FRACTION = 100


def too_many_bad(bad: int, seen: int, max_fraction: float) -> bool:
    """More than `max_fraction` of the `seen` samples are bad (judged from MIN_SEEN_FOR_FRACTION samples on)."""
    return seen >= MIN_SEEN_FOR_FRACTION and bad > max_fraction * seen


def too_many_bad_message(bad: int, seen: int, max_fraction: float, where: str) -> str:
    return (f"{bad} of the {seen} samples seen so far in {where} were bad (skipped, see the warnings above), more "
            f"than data.max_bad_fraction={max_fraction:g}: the data has a systematic problem rather than a few "
            f"corrupt files. Run once with data.verify_images=true to list every bad sample, fix or remove them, "
            f"or raise data.max_bad_fraction.")


def text_problem(conversations) -> Optional[str]:
    """Why the conversation's text cannot be tokenized as Unicode text, or None (lone UTF-16 surrogates, which
    JSON's \\ud83d escapes produce when an emoji was cut in half, make tokenizers fail with unrelated errors)."""
    for number, turn in enumerate(conversations, start=1):
        problem = surrogate_problem(turn["value"])
        if problem:
            return f"turn {number} ({turn['from']}) {problem}; fix or remove the text"
    return None


def read_entries(json_path: str) -> List[tuple]:
    """[(where, entry)] from a JSON list or a JSONL file; `where` names the file and line / entry for messages."""
    if not os.path.isfile(json_path):
        raise FactoryError(f"The data file {json_path} does not exist. Check the data config's `json` path "
                           f"(relative paths are resolved from the current directory).")
    text = read_utf8(json_path)
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


def data_options(data_cfg) -> Dict:
    """LlavaJsonDataset's bad-data options from the data config (`data.*`), with the run defaults: a long run skips
    the odd bad sample rather than dying on it (see docs/safety.md)."""
    get = data_cfg.get if data_cfg is not None else (lambda key, default=None: default)

    def number(key: str, default: float, low: float, high: float, nullable: bool = False) -> Optional[float]:
        value = get(key, default)
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise FactoryError(f"`data.{key}` must be a number in [{low:g}, {high:g}]{' or null' if nullable else ''}, "
                               f"got {value!r}; the default is {default}.")
        return float(value)

    allow = get("allow_outside_paths", False)
    if not isinstance(allow, bool):  # a YAML string "false" would read as true
        raise FactoryError(f"`data.allow_outside_paths` must be true or false, got {allow!r}.")
    return {"on_bad_sample": str(get("on_bad_sample", "skip")),
            "max_bad_fraction": number("max_bad_fraction", 0.01, 0.0, 1.0),
            "max_aspect_ratio": number("max_aspect_ratio", DEFAULT_MAX_ASPECT_RATIO, 1.0, float("inf"), True),
            "allow_outside_paths": allow}


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


def encode_entry(entry: Dict, where: str, template: Template, tokenizer, num_image_tokens: int,
                 max_length: Optional[int] = None, image_first: bool = True):
    """The template's EncodedSample of one valid entry (see `entry_problem`), exactly as training tokenizes it;
    any failure (text that is not Unicode, the template's or the tokenizer's own errors) is a BadSampleError whose
    message names `where` (file and line / entry) and the id. Training and `python -m factory.data.inspect` both
    call this, so they report a bad entry with the same message."""
    problem = text_problem(entry["conversations"])
    if problem:
        raise BadSampleError(f"{where} (id {entry['id']!r}): {problem}.")
    try:
        return encode_conversation(template, entry["conversations"], tokenizer, num_image_tokens, max_length,
                                   image_first=image_first)
    except FactoryError as err:
        raise BadSampleError(f"{where} (id {entry['id']!r}): {err}") from None
    except Exception as err:  # the tokenizer's own errors say nothing about which sample broke it
        raise BadSampleError(
            f"{where} (id {entry['id']!r}): the tokenizer cannot encode this entry's text "
            f"({type(err).__name__}: {err}). Fix or remove the entry."
        ) from None


def rejected_entry_message(where: str, entry, problem: str) -> str:
    """The message for an entry that `entry_problem` rejects (naming its file, line / entry and id when it has one)."""
    sample = f" (id {entry['id']!r})" if isinstance(entry, dict) and "id" in entry else ""
    return f"{where}{sample}: {problem}. Fix or remove this entry."


class LlavaJsonDataset(torch.utils.data.Dataset):
    """Map-style dataset of LLaVA conversations; items are
    ``{id, input_ids: LongTensor[T], labels: LongTensor[T], pixel_values: FloatTensor[3,H,W] | None}``."""

    def __init__(self, json_path: str, image_folder: Optional[str], tokenizer,
                 template: Union[str, Template], image_transform: Optional[Callable],
                 num_image_tokens: int, max_length: Optional[int] = None, on_bad_sample: str = "error",
                 max_bad_fraction: float = 0.01, max_aspect_ratio: Optional[float] = DEFAULT_MAX_ASPECT_RATIO,
                 allow_outside_paths: bool = False, image_first: bool = True):
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise FactoryError(f"data.on_bad_sample = {on_bad_sample!r} is not one of {ON_BAD_SAMPLE} (error = stop "
                               f"at the first bad sample, skip = log it, substitute the next good one, go on).")
        self.on_bad_sample = on_bad_sample
        self.max_bad_fraction = float(max_bad_fraction)
        self.max_aspect_ratio = max_aspect_ratio
        self.allow_outside_paths = bool(allow_outside_paths)
        self.json_path = str(json_path)
        self.image_folder = None if image_folder is None else str(image_folder)
        self.tokenizer = tokenizer
        self.template = get_template(template) if isinstance(template, str) else template
        self.image_first = bool(image_first)  # LLaVA's rule: <image> moved to the front of its turn
        self.image_transform = image_transform
        self.num_image_tokens = int(num_image_tokens)
        self.max_length = max_length
        self.entries: List[Dict] = []
        self._where: List[str] = []
        self._skipped: set = set()
        self._bad: Dict[int, str] = {}  # index → message of the samples found bad (here or by verify)
        self._seen = 0                   # samples tried by __getitem__ in this process (bad ones included)
        self._bad_seen = 0               # of which bad (each meeting counts, as in the loop's totals)

        for where, entry in read_entries(self.json_path):
            problem = entry_problem(entry)
            if problem:
                raise FactoryError(rejected_entry_message(where, entry, problem))
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
        image_indices = [i for i, has in enumerate(self.has_image) if has]
        for i in image_indices:  # refuses absolute paths, '..' and symlinks out of image_folder (unless allowed)
            resolve_in_folder(self.image_folder, self.entries[i]["image"], self.allow_outside_paths,
                              f" of sample id {self.entries[i]['id']!r} ({self._where[i]})")
        missing = [i for i in image_indices if not os.path.isfile(self.image_path(i))]
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

    @property
    def num_bad(self) -> int:
        """Distinct bad samples known to this process (met by __getitem__ or marked by verify)."""
        return len(self._bad)

    def describe(self, index: int) -> str:
        """'sample id 'x' (file, entry 3)': how every message names a sample."""
        return f"sample id {self.entries[index]['id']!r} ({self._where[index]})"

    def mark_bad(self, index: int, message: str) -> None:
        """Record a sample found bad up front (data.verify_images): __getitem__ skips it without decoding again."""
        self._bad.setdefault(index, message)  # a sample with two faults keeps the first

    def open_image(self, index: int):
        """The sample's image as 8-bit RGB PIL (decoded completely), or a FactoryError naming file and sample."""
        context = f" of {self.describe(index)}"
        path = resolve_in_folder(self.image_folder, self.entries[index]["image"], self.allow_outside_paths, context)
        return open_image(path, context, max_aspect_ratio=self.max_aspect_ratio)

    def load_image(self, index: int) -> torch.Tensor:
        image = self.open_image(index)
        try:
            return self.image_transform(image)
        except FactoryError as err:  # e.g. the pad canvas limit: add which sample it was
            raise FactoryError(f"{self.describe(index)}: {err}") from None

    def tokenize(self, index: int):
        """The template's EncodedSample; any failure is a BadSampleError naming file, entry and id."""
        return encode_entry(self.entries[index], self._where[index], self.template, self.tokenizer,
                            self.num_image_tokens, self.max_length, self.image_first)

    def encode(self, index: int) -> Optional[Dict]:
        """The item at `index`, or None when max_length would cut its image span (no substitution, no counting).
        A bad sample raises BadSampleError."""
        if index in self._bad:
            raise BadSampleError(self._bad[index])
        entry = self.entries[index]
        encoded = self.tokenize(index)
        if encoded.truncated_image:
            return None
        try:
            pixel_values = self.load_image(index) if self.has_image[index] else None
        except BadSampleError:
            raise
        except FactoryError as err:
            raise BadSampleError(str(err)) from None
        return {
            "id": entry["id"],
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
            "pixel_values": pixel_values,
        }

    def _skip_bad(self, index: int, err: BadSampleError) -> Dict[str, str]:
        """on_bad_sample=skip: log the sample once per process, count it, stop when too many are bad."""
        self._bad_seen += 1
        if index not in self._bad:
            self._bad[index] = str(err)
            logger.warning("Skipping a bad sample (data.on_bad_sample=skip; it is replaced by the next good sample, "
                           "%d bad of %d seen by this process): %s", self._bad_seen, self._seen, err)
        if too_many_bad(self._bad_seen, self._seen, self.max_bad_fraction):
            raise FactoryError(too_many_bad_message(self._bad_seen, self._seen, self.max_bad_fraction,
                                                    f"{self.json_path} (this process)"))
        return {"id": str(self.entries[index]["id"]), "where": self._where[index], "reason": str(err)}

    def __getitem__(self, index: int) -> Dict:
        bad: List[Dict[str, str]] = []
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            self._seen += 1
            try:
                item = self.encode(candidate)
            except BadSampleError as err:
                if self.on_bad_sample == "error":
                    raise FactoryError(f"{err} (data.on_bad_sample=error; with data.on_bad_sample=skip the run "
                                       f"would skip it and go on)") from None
                bad.append(self._skip_bad(candidate, err))
                continue
            if item is not None:
                if bad:  # only then: a clean item keeps exactly the documented keys
                    item["bad_samples"] = bad
                return item
            if candidate not in self._skipped:
                self._skipped.add(candidate)
                logger.warning(
                    "Skipping sample id %r (%s): with max_length=%s the truncation would cut its %d image tokens; "
                    "it is replaced by the next sample that fits (%d skipped so far). Raise trainer.max_length to "
                    "keep it.", self.entries[candidate]["id"], self._where[candidate], self.max_length,
                    self.num_image_tokens, len(self._skipped))
        if bad:  # every candidate was tried once: each is either bad or too long
            too_long = len(self) - len(bad)
            detail = (f"all {len(self)} are bad" if not too_long else
                      f"{len(bad)} are bad and the other {too_long} are longer than max_length={self.max_length} "
                      f"before their image ends")
            raise FactoryError(f"No sample of {self.json_path} can be used: {detail} (see the warnings above). Fix "
                               f"the data{', or raise trainer.max_length' if too_long else ''}.")
        raise FactoryError(
            f"Every sample of {self.json_path} is longer than max_length={self.max_length} before its image ends, so "
            f"none can be trained on. Raise trainer.max_length."
        )
