"""Talk to a checkpoint about one image: `python chat.py checkpoint=<dir> image=<file>` (interactive, multi-turn)
or add `question="..."` for one answer printed to stdout. chat.py is a Hydra app (configs/chat.yaml)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from factory.checkpoint import load_checkpoint
from factory.command_line import compose_app, missing_checkpoint
from factory.constants import IMAGE_MARKER
from factory.data.templates import image_first_text
from factory.errors import FactoryError
from factory.eval.cli import pick_device, remote_code_opt_in
from factory.eval.generate import decode, generate_ids, left_pad, load_pixels, template_of
from factory.model.loading import module_device


class ChatSession:
    """A conversation about (at most) one image; each `ask` re-encodes the whole history with the model's template
    so the prompt is exactly what training saw, then decodes greedily."""

    def __init__(self, model, image: Optional[str] = None, max_new_tokens: int = 256):
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.turns: List[Dict[str, str]] = []
        self.pixel_values = None
        if image is not None:
            # the user's own choice of file: not confined to a folder, only checked to be a picture file
            if Path(image).is_dir():
                raise FactoryError(f"The image {image} is a folder, not a picture file; pass image=<path to a "
                                   f"picture>.")
            if not Path(image).is_file():
                raise FactoryError(f"The image {image} does not exist; pass image=<path to a picture>.")
            pixels = load_pixels(model, None, str(Path(image).resolve()))
            self.pixel_values = pixels[None].to(module_device(model), getattr(model.vision, "dtype", torch.float32))

    @torch.no_grad()
    def ask(self, question: str) -> str:
        question = question.replace(IMAGE_MARKER, "").strip()
        if not self.turns and self.pixel_values is not None:
            question = image_first_text(IMAGE_MARKER + question)  # the image first, as in training (LLaVA's rule)
        conversation = self.turns + [{"from": "human", "value": question}]
        prompt = template_of(self.model).encode_prompt(conversation, self.model.tokenizer,
                                                       self.model.image_token_count)
        input_ids, mask = left_pad([prompt], 0)
        device = module_device(self.model)
        batch = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
                 "pixel_values": self.pixel_values}
        answer = decode(self.model, generate_ids(self.model, batch, self.max_new_tokens)[0])
        self.turns = conversation + [{"from": "gpt", "value": answer}]
        return answer


ROOT_CONFIG = "chat"  # configs/chat.yaml
USAGE = ("checkpoint=<dir> image=<file> [question=...] [max_new_tokens=N] [device=cpu|cuda] "
         "[trust_remote_code=true]")


def main(argv: Optional[List[str]] = None) -> int:
    """`python chat.py <argv>` in-process: compose configs/chat.yaml with the arguments, then chat."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = compose_app(argv, ROOT_CONFIG, "chat.py", USAGE)
    except FactoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run_app(cfg)


def run_app(cfg) -> int:
    """The job of chat.py's Hydra app (and of `main`): one answer for question=..., else a terminal chat."""
    try:
        problem = missing_checkpoint(cfg, "chat.py")
        if problem:
            raise FactoryError(problem)
        model = load_checkpoint(cfg.checkpoint, device=pick_device(cfg.device),
                                trust_remote_code=remote_code_opt_in(cfg, "chat.py"))
        session = ChatSession(model, cfg.image, int(cfg.max_new_tokens))
        if cfg.question is not None:
            print(session.ask(str(cfg.question)))
            return 0
        print("Ask about the image; an empty line or Ctrl-D ends the chat.", file=sys.stderr)
        # The "USER: " prompt is for a person at a terminal; questions piped in get only the answer lines.
        prompt = "USER: " if sys.stdin.isatty() else ""
        while True:
            try:
                question = input(prompt).strip()
            except EOFError:
                break
            if not question:
                break
            print(f"ASSISTANT: {session.ask(question)}")
    except FactoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
