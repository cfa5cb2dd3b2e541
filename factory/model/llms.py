"""LLMs: load a causal LM and its tokenizer; find its decoder blocks.

One loader, ``load_llm(cfg_node, init, dtype) -> (causal_lm, tokenizer)``, registered in factory.registry.LLMS under
four names (the YAML's `llm.name`):
  * ``phi``          – Phi-2 (PhiForCausalLM);
  * ``llama``        – Llama / Vicuna v1.5 (LlamaForCausalLM); ``vicuna`` is the same;
  * ``hf_causal_lm`` – any AutoModelForCausalLM.
The names differ only in the padding-token policy: Llama tokenizers have no pad token and LLaVA pads with `<unk>`
(so padding never looks like an end of turn); every other family pads with its eos token. Padding positions are
masked by the attention mask and IGNORE_INDEX labels, so the choice never changes the loss.

Config keys: ``path`` (hub id or folder, init=pretrained), ``arch`` (+ optional ``arch_overrides``, init=random|meta),
``tokenizer`` (defaults to ``path``), ``attn_implementation`` (sdpa), ``trust_remote_code`` (false).
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional, Tuple

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from factory.errors import FactoryError
from factory.model.loading import from_pretrained_or_explain, load_arch, node_get
from factory.registry import LLMS


def remote_code_flag(cfg: Any) -> bool:
    """`llm.trust_remote_code` as a real boolean: a string such as "false" must not count as true."""
    value = node_get(cfg, "trust_remote_code", False)
    if not isinstance(value, bool):
        raise FactoryError(f"`llm.trust_remote_code` is {value!r}; set it to true or false (true runs Python code "
                           "shipped with the model; leave it false unless you trust that code).")
    return value


def load_tokenizer(cfg: Any, init: str, pad_with_unk: bool):
    """The tokenizer named by `tokenizer` (or `path`); None is allowed only for init=meta (parameter counting)."""
    source = node_get(cfg, "tokenizer") or node_get(cfg, "path")
    if not source:
        if init == "meta":
            return None
        raise FactoryError(
            "The LLM config has neither `llm.tokenizer` nor `llm.path`, so no tokenizer can be loaded. "
            "Set one of them to a hub id or a folder with tokenizer files."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(source), trust_remote_code=remote_code_flag(cfg)
        )
    except (OSError, ValueError) as err:
        if init == "meta":  # offline counting of a hub model must not need its tokenizer
            return None
        raise FactoryError(
            f"Could not load the tokenizer from {source!r} (`llm.tokenizer` or `llm.path`): {err}. "
            "Check the hub id / folder; offline, download it first or point `llm.tokenizer` to a local copy."
        ) from None
    if tokenizer.pad_token is None:
        fallback = tokenizer.unk_token if pad_with_unk and tokenizer.unk_token is not None else tokenizer.eos_token
        if fallback is None:
            raise FactoryError(
                f"The tokenizer from {source!r} has no pad, unk or eos token; add a pad token to its files."
            )
        tokenizer.pad_token = fallback
    return tokenizer


def load_causal_lm(cfg: Any, init: str, dtype: torch.dtype) -> nn.Module:
    attn = str(node_get(cfg, "attn_implementation", "sdpa"))
    remote = remote_code_flag(cfg)
    if init == "pretrained":
        path = node_get(cfg, "path")
        if not path:
            raise FactoryError("`llm.path` is empty; set it to a HF hub id or a local folder (or use init=random).")
        return from_pretrained_or_explain(AutoModelForCausalLM, path, "llm.path", "LLM", dtype=dtype,
                                          attn_implementation=attn, trust_remote_code=remote)
    values = load_arch(cfg, "llm")
    values.pop("torch_dtype", None)
    values.pop("architectures", None)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    # init=random builds on the caller's default device (CPU, or e.g. the GPU inside `with torch.device("cuda")`,
    # where the throughput benchmark initialises 13B weights in seconds instead of minutes of CPU normal_()).
    with torch.device("meta") if init == "meta" else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, trust_remote_code=remote)
    return model.to(dtype)


# The registered LLM names are aliases of one loader; they differ only in the padding token (module docstring).
PADS_WITH_UNK = {"phi": False, "llama": True, "vicuna": True, "hf_causal_lm": False}


def load_llm(cfg: Any, init: str, dtype: torch.dtype) -> Tuple[nn.Module, Optional[Any]]:
    """(causal LM, tokenizer) for `cfg` (the `llm` config node, whose `name` is one of PADS_WITH_UNK)."""
    model = load_causal_lm(cfg, init, dtype)
    tokenizer = load_tokenizer(cfg, init, PADS_WITH_UNK.get(str(node_get(cfg, "name", "hf_causal_lm")), False))
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


for _name in PADS_WITH_UNK:
    LLMS.register(_name)(load_llm)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks of a causal LM (Phi, Llama, most HF LMs), also through a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    candidates = []
    if hasattr(base, "get_decoder"):
        try:
            decoder = base.get_decoder()
        except (AttributeError, NotImplementedError):
            decoder = None
        if decoder is not None:
            candidates += [getattr(decoder, "layers", None), getattr(decoder, "h", None)]
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers"):
        node = base
        for part in path.split("."):
            node = getattr(node, part, None)
        candidates.append(node)
    for found in candidates:
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    raise FactoryError(
        f"Could not find the decoder blocks of {type(base).__name__}: expected a ModuleList at model.layers, "
        "transformer.h or get_decoder().layers. Use llm=phi, llm=llama or a standard HF causal LM."
    )
