"""A factory checkpoint as an lmms-eval model: `python eval.py checkpoint=<run>/<stage> harness=lmms_eval tasks=...`,
or `python -m lmms_eval --model factory --model_args pretrained=<run>/<stage> --tasks ...` (the `lmms_eval.models`
entry point in setup.py).

The model answers lmms-eval's requests exactly as `eval.py` answers a benchmark: the checkpoint's own chat template
with the image marker first, its vision tower's image transform, batched greedy decoding with a KV cache that stops at
the template's end token (factory/eval/generate.py), and MoReS steering of the prompt (prefill) pass. On top of that
it honours a request's `until` stop strings (the answer is cut before the first one) and `max_new_tokens`, and it
scores `loglikelihood` requests (multiple-choice tasks) with the same prompt.

lmms-eval is imported only when the class is first needed (`lmms_class()`, or `FactoryLMMS` as a module attribute):
`factory.harness` imports every harness module to register them, and lmms-eval takes seconds to import.
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from factory.checkpoint import load_checkpoint
from factory.constants import IMAGE_MARKER
from factory.data.images import to_rgb
from factory.distributed import launcher_world
from factory.errors import FactoryError
from factory.eval.generate import (batch_from_pixels, batched, conversation_for, generate_ids, left_pad,
                                   template_of)
from factory.model.loading import module_device

MODEL_NAME = "factory"  # --model factory
DEFAULT_MAX_NEW_TOKENS = 128  # when a task's generation_kwargs name none


def pick_device(setting: Optional[str]) -> str:
    if setting and setting != "auto":
        return str(setting)
    return "cuda" if torch.cuda.is_available() else "cpu"


def cut_at_stop_strings(text: str, until: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string (lmms-eval's `until`). Greedy decoding is
    deterministic, so cutting afterwards gives the answer an early stop would have given."""
    cut = len(text)
    for stop in until:
        if stop:
            found = text.find(stop)
            if found != -1:
                cut = min(cut, found)
    return text[:cut]


class FactoryRequestAnswerer:
    """What the lmms-eval model does, kept free of lmms-eval imports; `lmms_class()` joins it with `lmms`.

    Arguments (lmms-eval's `--model_args key=value,...`): `pretrained` (a checkpoint folder `<run_dir>/<stage>`),
    `device` (auto | cpu | cuda:N), `dtype` (null = the checkpoint's default; bf16 | fp16 | fp32), `batch_size`,
    `max_new_tokens` (when a task sets none), `trust_remote_code`. `model=` passes an already loaded LlavaModel
    (eval.py's harness and the tests)."""

    is_simple = True
    ARGS = ("pretrained", "model", "device", "dtype", "batch_size", "max_new_tokens", "trust_remote_code",
            "max_batch_size")

    def __init__(self, pretrained: Optional[str] = None, model: Any = None, device: Optional[str] = "auto",
                 dtype: Optional[str] = None, batch_size: Any = 8, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 trust_remote_code: bool = False, max_batch_size: Optional[int] = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise FactoryError(f"Unknown lmms-eval model argument(s) for --model {MODEL_NAME}: "
                               f"{', '.join(sorted(unknown))}. Accepted: {', '.join(self.ARGS[:-1])} (--model_args "
                               "pretrained=<run_dir>/<stage>,batch_size=8).")
        if model is None and not pretrained:
            raise FactoryError(f"--model {MODEL_NAME} needs --model_args pretrained=<run_dir>/<stage> (a checkpoint "
                               "folder written by train.py).")
        if str(batch_size).startswith("auto"):
            batch_size = 8  # lmms-eval's `auto` batch sizing is not supported: a fixed default instead
        try:
            self.batch_size_per_gpu = int(batch_size)
            self.default_max_new_tokens = int(max_new_tokens)
        except (TypeError, ValueError):
            raise FactoryError(f"--model {MODEL_NAME}: batch_size={batch_size!r} and max_new_tokens="
                               f"{max_new_tokens!r} must be whole numbers.") from None
        if self.batch_size_per_gpu < 1 or self.default_max_new_tokens < 1:
            raise FactoryError(f"--model {MODEL_NAME}: batch_size and max_new_tokens must be ≥ 1 (got "
                               f"{self.batch_size_per_gpu}, {self.default_max_new_tokens}).")
        if model is None:
            device = pick_device(device)
            if dtype is None and device.startswith("cuda"):
                dtype = "bf16"  # eval.py's default on a GPU
            model = load_checkpoint(str(pretrained), device=device, dtype=dtype,
                                    trust_remote_code=bool(trust_remote_code))
        self.model = model.eval()
        self._device = module_device(model)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self._rank, self._world_size = launcher_world()

    # lmms-eval reads these
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ------------------------------------------------------------------------------------------------ helpers
    def _doc(self, task: str, split: str, doc_id: int) -> Dict[str, Any]:
        return self.task_dict[task][split][doc_id]

    def _image(self, doc_to_visual, task: str, split: str, doc_id: int) -> Optional[torch.Tensor]:
        """The request's image through the checkpoint's transform, or None. One image per question (the factory's
        models take one); a video or several images are refused with the task and document named."""
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else []
        flat: List[Any] = []
        for visual in visuals or []:
            flat.extend(visual if isinstance(visual, (list, tuple)) else [visual])
        if not flat:
            return None
        if len(flat) > 1 or not hasattr(flat[0], "convert"):
            kind = f"{len(flat)} images" if len(flat) > 1 else f"a {type(flat[0]).__name__} (not an image)"
            raise FactoryError(f"lmms-eval task {task!r}, document {doc_id}: the task gives {kind}; factory models "
                               "answer questions about one image (or none). Pick an image task.")
        return self.model.vision.image_transform(to_rgb(flat[0]))

    def _conversation(self, context: str, has_image: bool) -> List[Dict[str, str]]:
        if not has_image and IMAGE_MARKER in context:
            context = context.replace(IMAGE_MARKER, "").strip()  # a marker with no image would get no pixels
        return conversation_for({"text": context, "image": "image" if has_image else None})

    def _generation(self, gen_kwargs: Dict[str, Any], task: str) -> Tuple[int, List[str]]:
        """(max_new_tokens, until) from a request's generation_kwargs. Decoding is greedy: a task asking for
        sampling or beam search is refused rather than silently answered greedily."""
        gen = dict(gen_kwargs or {})
        if gen.get("do_sample") or int(gen.get("num_beams") or 1) > 1:
            raise FactoryError(f"lmms-eval task {task!r} asks for do_sample={gen.get('do_sample')} / num_beams="
                               f"{gen.get('num_beams')}; the factory decodes greedily only. Override the task's "
                               "generation with harness.gen_kwargs=\"do_sample=False,num_beams=1\" (eval.py) or "
                               "--gen_kwargs (lmms-eval).")
        until = gen.get("until") or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
            raise FactoryError(f"lmms-eval task {task!r}: generation_kwargs.until must be a string or a list of "
                               f"strings, got {until!r}.")
        max_new_tokens = gen.get("max_new_tokens") or self.default_max_new_tokens
        return int(max_new_tokens), list(until)

    # ------------------------------------------------------------------------------------------- lmms-eval API
    @torch.no_grad()
    def generate_until(self, requests) -> List[str]:
        """Requests carry (context, generation_kwargs, doc_to_visual, doc_id, task, split). Batched in request order
        within each (task, split, generation settings) group; answers are returned in request order."""
        groups: Dict[str, List[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            _, gen_kwargs, _, _, task, split = request.args
            groups[json.dumps([task, split, gen_kwargs], sort_keys=True, default=str)].append(index)
        answers: List[Optional[str]] = [None] * len(requests)
        for indices in groups.values():
            task, split, gen_kwargs = (requests[indices[0]].args[i] for i in (4, 5, 1))
            max_new_tokens, until = self._generation(gen_kwargs, task)
            for chunk in batched(indices, self.batch_size_per_gpu):
                conversations, pixels = [], []
                for index in chunk:
                    context, _, doc_to_visual, doc_id, _, _ = requests[index].args
                    image = self._image(doc_to_visual, task, split, doc_id)
                    conversations.append(self._conversation(context, image is not None))
                    if image is not None:
                        pixels.append(image)
                batch = batch_from_pixels(self.model, conversations, pixels)
                for index, ids in zip(chunk, generate_ids(self.model, batch, max_new_tokens)):
                    raw = self.model.tokenizer.decode(ids, skip_special_tokens=True)
                    answers[index] = cut_at_stop_strings(raw, until).strip()
                    self.cache_hook.add_partial("generate_until", requests[index].args[:2], answers[index])
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        """Requests carry (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split). The
        continuation's tokens follow the template's prompt (the assistant cue), as a generated answer would;
        returns (sum of their log-probabilities, whether greedy decoding picks every one of them)."""
        results: List[Tuple[float, bool]] = []
        template = template_of(self.model)
        tokenizer = self.model.tokenizer
        pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        for chunk in batched(list(requests), self.batch_size_per_gpu):
            sequences, continuations, pixels = [], [], []
            for request in chunk:
                context, target, doc_to_visual, doc_id, task, split = request.args
                continuation = target if isinstance(target, str) else str(target(self._doc(task, split, doc_id)))
                image = self._image(doc_to_visual, task, split, doc_id)
                prompt = template.encode_prompt(self._conversation(context, image is not None), tokenizer,
                                                self.model.image_token_count)
                cont_ids = tokenizer.encode(continuation, add_special_tokens=False)
                sequences.append(prompt + cont_ids)
                continuations.append(cont_ids)
                if image is not None:
                    pixels.append(image)
            input_ids, attention_mask = left_pad(sequences, pad_id)
            pixel_values = None
            if pixels:
                pixel_values = torch.stack(pixels).to(self._device, getattr(self.model.vision, "dtype", torch.float32))
            logits = self.model(input_ids.to(self._device), attention_mask.to(self._device), pixel_values).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for row, cont_ids in enumerate(continuations):
                if not cont_ids:
                    results.append((0.0, True))
                    continue
                n = len(cont_ids)
                # left padding: every sequence ends at the last column; position t predicts token t + 1
                predicted = logprobs[row, -n - 1:-1]
                target_ids = torch.tensor(cont_ids, device=predicted.device)
                total = float(predicted.gather(-1, target_ids[:, None]).sum())
                results.append((total, bool((predicted.argmax(-1) == target_ids).all())))
        return results

    def generate_until_multi_round(self, requests) -> List[str]:
        raise FactoryError("lmms-eval's multi-round generation tasks are not supported by the factory model; pick a "
                           "single-turn (generate_until or multiple_choice) task.")


_LMMS_CLASS: Optional[type] = None


def lmms_class() -> type:
    """`FactoryLMMS`: FactoryRequestAnswerer + lmms-eval's `lmms` base class, made on first use."""
    global _LMMS_CLASS
    if _LMMS_CLASS is None:
        from lmms_eval.api.model import lmms  # optional and slow: only when the lmms-eval harness runs

        _LMMS_CLASS = type("FactoryLMMS", (FactoryRequestAnswerer, lmms), {"__module__": __name__})
    return _LMMS_CLASS


def __getattr__(name: str) -> Any:
    # `factory.harness.lmms_eval_model.FactoryLMMS`, the class path lmms-eval's registry imports
    if name == "FactoryLMMS":
        return lmms_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lmms_eval_manifest():
    """The `lmms_eval.models` entry point (setup.py): `--model factory` → FactoryLMMS."""
    from lmms_eval.models.registry_v2 import ModelManifest  # optional: only lmms-eval calls this

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.FactoryLMMS")
