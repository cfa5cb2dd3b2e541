"""Tiny models and tokenizers for tests and smoke runs (random weights, built offline in well under a second).

    from factory.testing import tiny_model, tiny_tokenizer
    model = tiny_model(llm="llama", vision="hf_siglip")      # a LlavaModel built through build_model
    tok = tiny_tokenizer()                                    # PreTrainedTokenizerFast, vocab 512

The tokenizer is a byte-level BPE trained in memory on a small fixed English corpus that covers the chat
templates ("A chat between a curious user…", "USER:", "ASSISTANT:") and micro-world words, so templated
conversations tokenize into few tokens; byte-level means any text encodes without <unk>.
"""
from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from factory.model.build import build_model

TINY_VOCAB_SIZE = 512
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, matching tiny-*.json (bos 1, eos 2)

_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
           "detailed, and polite answers to the user's questions.")
_CORPUS = [
    _SYSTEM,
    f"{_SYSTEM} USER: What is in the image? ASSISTANT: A red circle and a blue square.",
    "USER: What colour is the shape? ASSISTANT: The shape is green.",
    "USER: How many shapes are there? ASSISTANT: There are three shapes.",
    "USER: Is there a yellow triangle in the image? ASSISTANT: Yes, there is.",
    "USER: Is there a purple star? ASSISTANT: No, there is not.",
    "USER: Where is the orange square? ASSISTANT: The orange square is on the left, at the top.",
    "USER: Answer the question using a single word or phrase. ASSISTANT: right",
    "A red circle. A blue square. A green triangle. A yellow star. An orange hexagon. A purple ellipse.",
    "one two three four five six seven eight nine ten zero",
    "left right top bottom middle center above below next to",
    "The image shows a small white cross on a black background.",
    "Describe the picture briefly. Caption: two shapes on a grey canvas.",
    "Answer with the option's letter from the given choices directly. A. B. C. D.",
    "the a an is are of in on to and with there this that what which how many where yes no",
]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tokenizer.to_str()


def tiny_tokenizer(directory: Optional[Union[str, Path]] = None):
    """A fresh PreTrainedTokenizerFast (vocab ≤ 512, bos <s>, eos </s>, pad <pad>, unk <unk>); saved to `directory`
    (loadable with AutoTokenizer.from_pretrained) when given."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if directory is not None:
        tokenizer.save_pretrained(str(directory))
    return tokenizer


def tiny_tokenizer_dir() -> Path:
    """A cached folder holding tiny_tokenizer() (content-addressed, written atomically, shared by processes)."""
    digest = hashlib.sha1(_tokenizer_json().encode()).hexdigest()[:12]
    target = Path(tempfile.gettempdir()) / f"factory-tiny-tokenizer-{digest}"
    if not (target / "tokenizer.json").is_file():
        staging = Path(tempfile.mkdtemp(prefix="factory-tiny-tokenizer-"))
        tiny_tokenizer(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process won the race; its copy is identical
            pass
    return target


def tiny_config(llm: str = "phi", vision: str = "hf_clip", connector: str = "mlp2x_gelu", image_size: int = 32,
                patch_size: int = 8, hidden: int = 64, layers: int = 2, seed: int = 0,
                template: Optional[str] = None, vision_hidden: Optional[int] = None) -> DictConfig:
    """The resolved-style config (init=random) that tiny_model builds; usable with build_model and checkpoints."""
    llm_arch = {"phi": "tiny-phi", "llama": "tiny-llama", "vicuna": "tiny-llama"}.get(llm)
    vision_arch = {"hf_clip": "tiny-clip", "hf_siglip": "tiny-siglip"}.get(vision)
    if llm_arch is None or vision_arch is None:
        raise ValueError(f"tiny models exist for llm in phi|llama|vicuna and vision in hf_clip|hf_siglip, "
                         f"not {llm!r}/{vision!r}")
    vision_hidden = vision_hidden or hidden
    return OmegaConf.create({
        "init": "random",
        "seed": seed,
        "vision": {
            "name": vision, "path": None, "arch": vision_arch, "select_layer": -2, "image_size": image_size,
            "image_aspect": "pad",
            "arch_overrides": {"image_size": image_size, "patch_size": patch_size, "hidden_size": vision_hidden,
                               "intermediate_size": 2 * vision_hidden, "num_hidden_layers": layers},
        },
        "connector": {"name": connector},
        "llm": {
            "name": llm, "path": None, "arch": llm_arch, "tokenizer": str(tiny_tokenizer_dir()),
            "template": template or ("phi" if llm == "phi" else "vicuna_v1"),
            "attn_implementation": "sdpa", "trust_remote_code": False,
            "arch_overrides": {"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers},
        },
    })


def tiny_model(llm: str = "phi", vision: str = "hf_clip", connector: str = "mlp2x_gelu", image_size: int = 32,
               patch_size: int = 8, hidden: int = 64, layers: int = 2, seed: int = 0, template: Optional[str] = None,
               vision_hidden: Optional[int] = None):
    """A LlavaModel with random weights (deterministic by `seed`), built through factory.model.build_model.

    (image_size / patch_size)² image tokens (16 by default); LLM vocabulary 512; fp32; dropout 0.
    """
    cfg = tiny_config(llm=llm, vision=vision, connector=connector, image_size=image_size, patch_size=patch_size,
                      hidden=hidden, layers=layers, seed=seed, template=template, vision_hidden=vision_hidden)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(cfg)
