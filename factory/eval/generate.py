"""From questions to answers: question files, prompts through the model's own template, images, batched greedy
generation (left padding, KV cache, stop at the template's end token) and decoding."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from factory.constants import IMAGE_MARKER
from factory.data.images import open_image, resolve_in_folder
from factory.data.templates import get_template, image_first_text
from factory.errors import FactoryError
from factory.eval.annotations import read_json_or_jsonl_lines
from factory.model.loading import module_device
from factory.text_files import surrogate_problem

Question = Dict[str, Any]


def load_questions(path: Path) -> List[Question]:
    """LLaVA question jsonl rows {question_id, image?, text, ...} or a LLaVA conversation JSON [{id, image?,
    conversations, ...}] (ScienceQA test file, micro-world eval.json). Returns rows with question_id, text, image
    (None when text-only) and every extra key (answer, category, question_type ...) kept. Messages name the file,
    the line (JSONL) or entry (JSON) and the question id."""
    rows, lines = read_json_or_jsonl_lines(Path(path), "questions")
    if isinstance(rows, dict):
        rows = rows.get("questions", rows.get("data", list(rows.values())))
        lines = None
    questions: List[Question] = []
    for i, row in enumerate(rows):
        where = f"{path}, line {lines[i]}" if lines else f"{path}, entry {i}"
        if not isinstance(row, dict):
            raise FactoryError(f"{where}: a question must be a JSON object, got {type(row).__name__}.")
        qid = row.get("question_id", row.get("id"))
        if "conversations" in row and "text" not in row:
            convs = row["conversations"]
            if not isinstance(convs, list) or not convs or not isinstance(convs[0], dict) \
                    or convs[0].get("from") != "human":
                raise FactoryError(f"{where} (question id {qid!r}) has no human first turn in `conversations`.")
            text = convs[0].get("value")
        else:
            text = row.get("text", row.get("question"))
        if qid is None or text is None:
            raise FactoryError(f"{where} lacks `question_id` (or `id`) or `text`. Question files are LLaVA jsonl "
                               f"rows {{question_id, image, text}}.")
        problem = surrogate_problem(str(text))
        if problem:
            raise FactoryError(f"{where} (question id {qid!r}): the question text {problem}. Fix or remove the "
                               f"question.")
        questions.append(dict(row, question_id=qid, text=str(text), image=row.get("image") or None,
                              _where=where))  # file and line / entry, for later messages
    ids = [str(q["question_id"]) for q in questions]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise FactoryError(f"question_id {dup} appears more than once in {path}; ids must be unique.")
    return questions


def check_image_paths(questions: Sequence[Question], image_folder: Optional[Path],
                      allow_outside_paths: bool = False) -> None:
    """Refuse a question whose image lies outside `image_folder` (absolute path, `..`, a symlink leading out), the
    check training applies to data files (factory.data.images.resolve_in_folder): a question file cannot make eval
    read other files, unless eval's `allow_outside_paths=true`."""
    for question in questions:
        if question.get("image"):
            resolve_in_folder(str(image_folder) if image_folder else None, str(question["image"]),
                              allow_outside_paths, f" of question id {question['question_id']!r} "
                                                   f"({question.get('_where', 'question file')})",
                              opt_in="allow_outside_paths=true (eval.py) if the question file is yours")


def missing_images(questions: Sequence[Question], image_folder: Optional[Path]) -> List[str]:
    return [str(q["image"]) for q in questions
            if q.get("image") and not (Path(image_folder or ".") / str(q["image"])).is_file()]


def conversation_for(question: Question) -> List[Dict[str, str]]:
    """The human turn the model sees: when the row has an image, the marker first by the rule training uses
    (`image_first_text`, LLaVA's `preprocess_multimodal`), wherever the question file put it or if it has none."""
    text = question["text"]
    if question.get("image"):
        text = image_first_text(IMAGE_MARKER + text)
    return [{"from": "human", "value": text}]


def template_of(model):
    if not model.template:
        raise FactoryError("The model has no chat template name (model.template); the checkpoint's meta.json "
                           "should record it. Set llm.template in the config.")
    return get_template(model.template)


def stop_token_ids(model) -> List[int]:
    """The template's end token: EOS for chat templates; the plain (captioning) template ends captions with '\\n'."""
    tokenizer = model.tokenizer
    stops = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    if model.template == "plain":
        newline = tokenizer.encode("\n", add_special_tokens=False)
        if len(newline) == 1:
            stops.append(int(newline[0]))
    return stops


def load_pixels(model, image_folder: Optional[Path], name: str) -> torch.Tensor:
    # the opener training uses: 16-bit images scaled, decompression bombs and extreme aspect ratios refused
    path = Path(image_folder or ".") / name
    return model.vision.image_transform(open_image(str(path)))


def left_pad(sequences: Sequence[List[int]], pad_id: int) -> tuple:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq):] = 1
    return ids, mask


def prepare_batch(model, conversations: Sequence[List[Dict[str, str]]], images: Sequence[Optional[str]],
                  image_folder: Optional[Path]) -> Dict[str, Any]:
    """Prompt ids (left-padded), attention mask and the stacked images of the samples that have one."""
    pixels = [load_pixels(model, image_folder, name) for name in images if name]
    return batch_from_pixels(model, conversations, pixels)


def batch_from_pixels(model, conversations: Sequence[List[Dict[str, str]]],
                      pixels: Sequence[torch.Tensor]) -> Dict[str, Any]:
    """`prepare_batch` for images already transformed (`model.vision.image_transform`), one per conversation that
    holds the image marker, in order; the lmms-eval model (factory/harness) gets its images as PIL objects."""
    template = template_of(model)
    prompts = [template.encode_prompt(conv, model.tokenizer, model.image_token_count) for conv in conversations]
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    input_ids, attention_mask = left_pad(prompts, int(pad_id))
    device = module_device(model)
    pixel_values = None
    if pixels:
        dtype = getattr(model.vision, "dtype", torch.float32)
        pixel_values = torch.stack(pixels).to(device=device, dtype=dtype)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "pixel_values": pixel_values, "prompt_lengths": [len(p) for p in prompts]}


@torch.no_grad()
def generate_ids(model, batch: Dict[str, Any], max_new_tokens: int) -> List[List[int]]:
    return model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                          max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(model))


def decode(model, ids: List[int]) -> str:
    return model.tokenizer.decode(ids, skip_special_tokens=True).strip()


def answer_questions(model, questions: Sequence[Question], image_folder: Optional[Path],
                     max_new_tokens: int) -> List[str]:
    """Greedy answers for one batch of questions (in order)."""
    batch = prepare_batch(model, [conversation_for(q) for q in questions], [q.get("image") for q in questions],
                          image_folder)
    return [decode(model, ids) for ids in generate_ids(model, batch, max_new_tokens)]


def batched(items: Sequence[Any], size: int):
    if size < 1:
        raise FactoryError(f"batch_size must be ≥ 1, got {size}.")
    for start in range(0, len(items), size):
        yield items[start:start + size]
