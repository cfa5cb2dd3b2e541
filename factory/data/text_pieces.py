"""How one piece of a conversation's text becomes token ids, measured once per tokenizer (`tokenizer_facts`).

The chat templates (factory.data.templates) build a sequence from pieces and tokenize each piece on its own, so the
label mask is exact by construction. Three ways of tokenizing text exist because tokenizers treat the *start* of a
string differently from text in the middle of it:

* ``start(text)`` - text at the start of one tokenizer call, the way LLaVA-1.5 tokenized it: LLaVA's
  ``tokenizer_image_token`` calls the tokenizer once per chunk between ``<image>`` markers, and its tokenizer
  (transformers 4.31, slow SentencePiece, "legacy") also restarts after every control token such as ``</s>``. A
  SentencePiece tokenizer puts its dummy-prefix space ``▁`` in front of every such start, *even when the text already
  starts with a space* (``" Hi"`` -> ``▁ ▁Hi``). Current tokenizers (the ``tokenizers`` Metaspace pre-tokenizer)
  skip the prefix when the text starts with a space, so for them the legacy result is the tokenization of
  ``" " + text`` (checked against the sentencepiece library on the real Llama-2 model). Byte-level BPE (GPT-2,
  Phi-2) has no dummy prefix: a start is just the text's own tokens.
* ``continuation(text)`` - text that follows earlier text in the same string, with no dummy prefix (" answer" ->
  the natural ``▁answer`` / ``Ġanswer`` tokens). SentencePiece tokenizers only add the prefix at the very start, so
  the text is tokenized behind an anchor (a newline: SentencePiece has no piece that merges a newline with anything;
  checked on every use) and the anchor's ids are dropped. Byte-level BPE needs no anchor.
* ``plain(text)`` - the tokenizer's own ids for the text, underlying both.

Text is text: every piece is tokenized with ``split_special_tokens=True``, so a conversation that contains the
*string* ``</s>``, ``<|endoftext|>`` or ``<s>`` gets the ordinary tokens of those characters, never the control ids.
Only the template's own ``bos``/``eos`` pieces produce control tokens (a web caption ending in "</s>" must not teach
the model to stop mid-answer).
"""
from __future__ import annotations

import weakref
from typing import List

from factory.errors import FactoryError

# The anchor for continuations: SentencePiece (Llama) stores "\n" only as a byte-fallback piece, so nothing merges
# across it; `_behind_anchor` checks that the anchor's ids came out intact before relying on it.
_ANCHOR = "\n"


class TokenizerFacts:
    """What piecewise encoding needs to know about one tokenizer (EOS, BOS, dummy prefix), measured once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        if tokenizer.eos_token_id is None or tokenizer.eos_token is None:
            raise FactoryError(
                f"The tokenizer {type(tokenizer).__name__} has no EOS token; the chat templates end every answer "
                f"with it. Set `tokenizer.eos_token` (e.g. in the LLM's tokenizer_config.json) before training."
            )
        self.eos_id = int(tokenizer.eos_token_id)
        self.eos_text = str(tokenizer.eos_token)
        if list(tokenizer.encode(self.eos_text, add_special_tokens=False)) != [self.eos_id]:
            raise FactoryError(
                f"The tokenizer {type(tokenizer).__name__} does not encode its EOS token {self.eos_text!r} as the "
                f"single id {self.eos_id}; register it as a special token so the templates can use it."
            )
        probe = self.plain("a")
        with_specials = list(tokenizer.encode("a", add_special_tokens=True))
        self.bos_ids: List[int] = []
        for i in range(len(with_specials) - len(probe) + 1):
            if with_specials[i:i + len(probe)] == probe:
                self.bos_ids = list(with_specials[:i])
                break
        self.anchor_ids = self.plain(_ANCHOR)
        # A dummy prefix exists when "a" at the start of a string differs from "a" behind other text.
        self.dummy_prefix = self.plain("a") != self._behind_anchor("a")
        # Metaspace-style tokenizers skip the prefix before a leading space (" a" == "a"); legacy SentencePiece did
        # not, and that is the behaviour `start` reproduces.
        self.prefix_skips_leading_space = self.dummy_prefix and self.plain(" a") == self.plain("a")

    def plain(self, text: str) -> List[int]:
        """The tokenizer's ids for `text`, control-token strings inside it tokenized as ordinary characters."""
        if not text:
            return []
        return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))

    def _behind_eos(self, text: str) -> List[int]:
        ids = list(self.tokenizer.encode(self.eos_text + text, add_special_tokens=False))
        return ids[1:]

    def _behind_anchor(self, text: str) -> List[int]:
        ids = self.plain(_ANCHOR + text)
        if ids[:len(self.anchor_ids)] != self.anchor_ids:
            return []  # the anchor merged with the text: not usable for this text
        return ids[len(self.anchor_ids):]

    def start(self, text: str) -> List[int]:
        """`text` at the start of one tokenizer call, as legacy SentencePiece (LLaVA-1.5) tokenized it."""
        if not text:
            return []
        if self.prefix_skips_leading_space:
            return self.plain(" " + text)
        return self.plain(text)

    def continuation(self, text: str) -> List[int]:
        """`text` following earlier text of the same string (no dummy prefix)."""
        if not text:
            return []
        if not self.dummy_prefix:
            return self.plain(text)
        ids = self._behind_anchor(text)
        if ids:
            return ids
        # The anchor merged with this text (not seen with SentencePiece; a guard for unusual tokenizers): tokenize
        # behind the EOS control token instead, where a control-token string inside `text` would be read as a
        # control token - refuse that rather than silently train on a stop token.
        if any(special in text for special in self.tokenizer.all_special_tokens):
            raise FactoryError(
                f"The tokenizer {type(self.tokenizer).__name__} cannot tokenize the text {text[:80]!r} (it contains "
                f"a control-token string) in the middle of a sequence as plain text. Remove the control-token "
                f"string from the data."
            )
        return self._behind_eos(text)


_FACTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tokenizer_facts(tokenizer) -> TokenizerFacts:
    """The cached facts of `tokenizer` (measured on first use: a handful of encode calls)."""
    try:
        facts = _FACTS.get(tokenizer)
    except TypeError:  # not weak-referenceable: measure every time
        return TokenizerFacts(tokenizer)
    if facts is None:
        facts = _FACTS[tokenizer] = TokenizerFacts(tokenizer)
    return facts
