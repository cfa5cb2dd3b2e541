"""World knowledge in miniature (the paper's Table 4): answering from a written description in context.

A text-only skill that the micro-world LMs learn in pretraining and that no image teaches: the held-out scene's
caption is written in the prompt, then the question (`<caption>\\n<question>`, no image), and the greedy answer is
scored as the micro-world eval scores it (`score_rows`: VQA-normalised exact match per question type). Measured for
a base LM (`lm_reading`: a bare causal LM through the chat template it was trained in; scripts/microworld_check.py)
and for a trained factory model (`model_reading`: the same prompt ids through the model's template, no image). The
retention of a run is 100 · tuned / base on the same rows: what stage 2 kept of the LM's own skill.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

import torch
from transformers import AutoModelForCausalLM

from factory.constants import IMAGE_MARKER
from factory.data.templates import get_template
from factory.eval.generate import answer_questions, batched, left_pad
from factory.eval.microworld import score_rows


def reading_rows(entries: Sequence[Dict[str, Any]], with_caption: bool = True) -> List[Dict[str, Any]]:
    """eval.json rows (with `caption`) as text-only question rows: the caption, a newline, the question."""
    rows = []
    for e in entries:
        question = e["conversations"][0]["value"].replace(IMAGE_MARKER + "\n", "").replace(IMAGE_MARKER, "").strip()
        rows.append({"question_id": e["id"], "question_type": e["question_type"], "answer": e["answer"],
                     "text": f"{e['caption']}\n{question}" if with_caption else question, "image": None})
    return rows


def per_type_percent(result: Dict[str, Any]) -> Dict[str, float]:
    """score_rows' result as {type: percent, ..., "all": percent}, rounded to 0.1."""
    out = {t: round(float(v), 1) for t, v in result["per_type"].items()}
    out["all"] = round(float(result["accuracy"]), 1)
    return out


@torch.no_grad()
def lm_reading(lm: Union[str, Path, torch.nn.Module], tokenizer, template: str, rows: Sequence[Dict[str, Any]],
               batch_size: int = 50, max_new_tokens: int = 4) -> Dict[str, Any]:
    """Greedy answers of a bare causal LM (a folder or a loaded model) to `rows`; score_rows' result."""
    if not isinstance(lm, torch.nn.Module):
        lm = AutoModelForCausalLM.from_pretrained(str(lm))
    lm.eval()
    chat = get_template(template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: List[str] = []
    for chunk in batched(list(rows), batch_size):
        prompts = [chat.encode_prompt([{"from": "human", "value": r["text"]}], tokenizer, 0) for r in chunk]
        ids, mask = left_pad(prompts, pad)  # every prompt ends where generation starts
        width = ids.shape[1]
        out = lm.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=pad)
        texts += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, width:]]
    return score_rows(list(zip(texts, rows)))


@torch.no_grad()
def model_reading(model, rows: Sequence[Dict[str, Any]], batch_size: int = 16,
                  max_new_tokens: int = 8) -> Dict[str, Any]:
    """Greedy answers of a factory model to the text-only `rows` (no image: no visual token, no connector)."""
    texts: List[str] = []
    for chunk in batched(list(rows), batch_size):
        texts += answer_questions(model, chunk, None, max_new_tokens)
    return score_rows(list(zip(texts, rows)))
