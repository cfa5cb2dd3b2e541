"""A factory model as an lm-evaluation-harness language model (`lm_eval.api.model.TemplateLM`), text only.

Every request runs through `LlavaModel.forward` with text token ids and no image, so the LLM is evaluated exactly as
the checkpoint's tuner leaves it for text-only input, with no tuner special-cased here:

* MoReS steers only the positions its batch observer selects among the *image* tokens; a text-only batch has none,
  so the hooks run and leave every hidden state untouched: the scores are the base LLM's
  (tests/test_harness_lm_eval.py proves it on the logits). MoReS with `modality=text` does steer text tokens, and
  does so here as well.
* LoRA / IA3 / OFT / QLoRA: the PEFT-wrapped LLM with its adapted weights; full: the tuned LLM; adapter: its modules.

Requests are scored in batches (left padding; LlavaModel derives position ids from the attention mask, so a padded
row scores like the unpadded one). Prompts are raw text, as lm-eval's tasks are written for base LMs (MMLU and
HellaSwag in the paper's Table 4); no chat template is applied.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from factory.errors import FactoryError
from factory.eval.generate import left_pad
from factory.model.loading import module_device


def _llm_max_length(model) -> int:
    config = getattr(model.llm, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


class FactoryTextLM(TemplateLM):
    """`FactoryTextLM(llava_model, batch_size=8)`: lm-eval's loglikelihood, rolling loglikelihood and greedy
    generation on the model's LLM, through the whole LlavaModel with text-only input."""

    backend = "causal"

    def __init__(self, model, batch_size: int = 8, max_length: Optional[int] = None, max_gen_toks: int = 256):
        super().__init__()
        if model.tokenizer is None:
            raise FactoryError("The model has no tokenizer, so lm-eval's text requests cannot be encoded; load it "
                               "with factory.load_checkpoint (the checkpoint's config names the tokenizer).")
        if int(batch_size) < 1:
            raise FactoryError(f"harness.batch_size={batch_size} must be at least 1.")
        self.model = model.eval()
        self.tokenizer = model.tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or _llm_max_length(model))
        self.max_gen_toks = int(max_gen_toks)
        self._device = module_device(model)
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise FactoryError("The model's tokenizer has no end-of-text token (eos_token_id), which lm-eval uses as "
                               "the context of a request with an empty prompt; set one in the tokenizer config.")
        self._eot = int(eos)
        pad = self.tokenizer.pad_token_id
        self._pad = int(pad) if pad is not None else self._eot

    # ---- tokenization (TemplateLM) ------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> List[int]:
        return list(self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    # ---- scoring -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _logits(self, rows: Sequence[List[int]]) -> Tuple[torch.Tensor, List[int]]:
        """fp32 log-probabilities [B, T, V] of left-padded `rows` (text only) and the pad width of each row."""
        ids, mask = left_pad(rows, self._pad)
        out = self.model(ids.to(self._device), mask.to(self._device))
        width = ids.shape[1]
        return F.log_softmax(out.logits.float(), dim=-1), [width - len(r) for r in rows]

    def _score(self, pairs: Sequence[Tuple[List[int], List[int]]]) -> List[Tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding yields the continuation) per pair."""
        results: List[Tuple[float, bool]] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            rows = []
            for context, continuation in chunk:
                if not continuation:
                    raise FactoryError("lm-eval sent a request with an empty continuation; check the task's "
                                       "doc_to_choice / doc_to_target (every answer must be non-empty text).")
                whole = (context + continuation)[-(self.max_length + 1):]
                rows.append(whole[:-1])  # the input predicting every token after the first
            logprobs, pads = self._logits(rows)
            for (context, continuation), row, pad, lp in zip(chunk, rows, pads, logprobs):
                n = len(continuation)
                picked = lp[pad + len(row) - n: pad + len(row)]  # the positions that predict the continuation
                target = torch.tensor(continuation, device=picked.device)
                logprob = picked.gather(-1, target[:, None]).sum().item()
                greedy = bool((picked.argmax(-1) == target).all())
                results.append((float(logprob), greedy))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> List[Tuple[float, bool]]:
        scores = self._score([(list(ctx), list(cont)) for _, ctx, cont in requests])
        for (key, _, _), score in zip(requests, scores):
            self.cache_hook.add_partial("loglikelihood", key, score)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        out = []
        for request in requests:
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)]
            total = sum(score for score, _ in self._score(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # ---- generation ----------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Greedy continuations (LlavaModel.generate: KV cache, batched), cut at the first `until` string."""
        out: List[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            settings = [self._generation_settings(r.args[1]) for r in chunk]
            max_new = max(s["max_gen_toks"] for s in settings)
            rows = [self.tok_encode(r.args[0])[-(self.max_length - max_new):] or [self._eot] for r in chunk]
            ids, mask = left_pad(rows, self._pad)
            new = self.model.generate(ids.to(self._device), mask.to(self._device), max_new_tokens=max_new,
                                      eos_token_id=[self._eot])
            for request, tokens, setting in zip(chunk, new, settings):
                text = self.tok_decode(tokens[:setting["max_gen_toks"]])
                for stop in setting["until"]:
                    if stop and stop in text:
                        text = text.split(stop, 1)[0]
                self.cache_hook.add_partial("generate_until", request.args, text)
                out.append(text)
        return out

    def _generation_settings(self, gen_kwargs: Dict[str, Any]) -> Dict[str, Any]:
        kwargs = dict(gen_kwargs or {})
        if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
            raise FactoryError("The factory's lm-eval model decodes greedily only; this task asks for sampling "
                               f"(generation_kwargs {kwargs}). Pick a task with greedy generation or loglikelihood.")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        return {"until": until, "max_gen_toks": int(kwargs.get("max_gen_toks", self.max_gen_toks))}

