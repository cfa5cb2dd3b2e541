"""Chat templates: turn a LLaVA conversation into token ids + loss labels by tokenizing it piece by piece.

A template only decides the *layout* (which text goes where, which pieces carry loss). The ids are the
concatenation of the pieces' ids, so the label mask is exact by construction: no re-tokenising the whole string and
comparing lengths. The pieces reproduce the sequences LLaVA-1.5 (``vicuna_v1``) and TinyLLaVA (``phi``, ``plain``)
train and evaluate with, token for token (tests/test_llava_parity.py). How each piece is tokenized
(factory.data.text_pieces):

* ``bos``   - the BOS id(s) the tokenizer itself adds at the start of a text (Llama: ``<s>``; Phi-2: none).
* ``start`` - text that LLaVA tokenizes at the start of a tokenizer call: the first chunk, the chunk after the image
  (LLaVA splits the prompt at ``<image>``) and, with its legacy SentencePiece tokenizer, the text after each ``</s>``.
  SentencePiece puts its dummy-prefix piece there, hence the lone ``▁`` (29871) right after LLaVA-1.5's image span.
* ``text``  - text that continues after an earlier piece of the same string, without a dummy prefix: " answer"
  becomes exactly the natural tokens of " answer" inside a sentence (Llama ``▁A ▁cat .``, GPT-2 ``ĠA Ġcat .``).
* ``image`` - ``num_image_tokens`` copies of IMAGE_TOKEN_INDEX (never labelled).
* ``eos``   - the tokenizer's EOS id: the templates share a layout, only the tokenizer knows the end token
  (``<|endoftext|>`` for Phi-2, ``</s>`` for Vicuna).

Text is text: control-token strings inside the conversation (``</s>``, ``<|endoftext|>``, ``<s>``) are tokenized as
ordinary characters; only the ``bos``/``eos`` pieces are control tokens.

Image first: `image_first_text` / `move_image_first` are LLaVA's ``preprocess_multimodal`` (the ``<image>`` marker
moved to the front of its turn, ``<image>\\n`` + the rest stripped). The dataset applies it (`encode_conversation`)
unless ``data.image_first: false``; eval and chat always build their prompts through it, so all three see the same
prompt for the same question.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from factory.constants import IGNORE_INDEX, IMAGE_MARKER, IMAGE_TOKEN_INDEX
from factory.errors import FactoryError
from factory.data.text_pieces import tokenizer_facts
from factory.registry import TEMPLATES

HUMAN, ASSISTANT = "human", "gpt"

Conversation = Sequence[Dict[str, str]]
# One piece of a layout: (kind, text or None, trained). kind is one of bos | start | text | image | eos.
Piece = Tuple[str, Optional[str], bool]


@dataclass
class EncodedSample:
    input_ids: List[int]
    labels: List[int]
    # True when max_length would cut into (or drop) the image span: the caller must skip the sample.
    truncated_image: bool = False
    # True when the sample was longer than max_length and its tail was cut.
    truncated: bool = False


def conversation_problem(conversations, has_image: Optional[bool] = None) -> Optional[str]:
    """Why `conversations` is not a valid LLaVA conversation, or None. `has_image` (when known) checks the marker.

    Valid: a non-empty list of {from, value} turns alternating human, gpt, human, gpt ... ending with gpt; the image
    marker appears at most once, only in the first human turn, and exactly when the sample has an image.
    """
    if not isinstance(conversations, (list, tuple)) or not conversations:
        return "`conversations` must be a non-empty list of {from, value} turns"
    markers = 0
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return f"turn {i} must be an object with keys `from` and `value` (got {str(turn)[:80]!r})"
        role, value = turn["from"], turn["value"]
        if role not in (HUMAN, ASSISTANT):
            return f"turn {i} has role {role!r}; roles must be 'human' or 'gpt'"
        expected = HUMAN if i % 2 == 0 else ASSISTANT
        if role != expected:
            return (f"turn {i} is {role!r} but {expected!r} was expected: turns must alternate human, gpt, "
                    f"human, gpt ... starting with human")
        if not isinstance(value, str):
            return f"turn {i} has a non-string `value` ({type(value).__name__})"
        count = value.count(IMAGE_MARKER)
        if count and i != 0:
            return f"{IMAGE_MARKER} appears in turn {i}; it may only appear in the first human turn"
        markers += count
    if len(conversations) % 2:
        return "the conversation ends with a human turn; every human turn needs a gpt answer"
    if markers > 1:
        return f"{IMAGE_MARKER} appears {markers} times; a sample has at most one image"
    if has_image is True and markers == 0:
        return f"the sample has an `image` but its first human turn has no {IMAGE_MARKER} marker"
    if has_image is False and markers == 1:
        return f"the sample has no `image` but its first human turn contains {IMAGE_MARKER}"
    return None


def image_first_text(value: str) -> str:
    """One turn's text with the image marker moved first, exactly as LLaVA's `preprocess_multimodal` does it:
    ``<image>\\n`` + the text without the marker, stripped; the whole stripped again (a turn that is only the marker
    stays ``<image>``). Text without the marker is returned unchanged. Training, eval and chat all use this."""
    if IMAGE_MARKER not in value:
        return value
    return (IMAGE_MARKER + "\n" + value.replace(IMAGE_MARKER, "").strip()).strip()


def move_image_first(conversations: Conversation) -> List[Dict[str, str]]:
    """`image_first_text` applied to every turn (only the first human turn may hold the marker). Returns new turn
    dicts; `conversations` is not modified (dataset entries are encoded again every epoch)."""
    return [dict(turn, value=image_first_text(turn["value"])) if isinstance(turn.get("value"), str) else dict(turn)
            for turn in conversations]


def _split_marker(text: str) -> Tuple[str, Optional[str]]:
    """'before<image>after' -> ('before', 'after'); no marker -> (text, None)."""
    if IMAGE_MARKER not in text:
        return text, None
    before, after = text.split(IMAGE_MARKER, 1)
    return before, after


class Template:
    """Base class. Subclasses implement `pieces(conversations, prompt_only)`; encoding is shared."""

    name = "base"
    # Whether the human turns' text is part of the encoding (False for 'plain', which keeps only the image).
    encodes_human_text = True

    def pieces(self, conversations: Conversation, prompt_only: bool) -> List[Piece]:
        raise NotImplementedError

    def encode(self, conversations: Conversation, tokenizer, num_image_tokens: int,
               max_length: Optional[int] = None) -> EncodedSample:
        """Token ids and labels (IGNORE_INDEX except on the trained pieces) of a whole conversation.

        When the sequence is longer than `max_length` its tail is cut; if the cut would reach into the image span,
        `truncated_image` is set and the (unusable) cut ids are returned for the caller to skip the sample.
        """
        problem = conversation_problem(conversations)
        if problem:
            raise FactoryError(f"Cannot encode a conversation with the {self.name!r} template: {problem}.")
        ids, labels = self._render(self.pieces(conversations, prompt_only=False), tokenizer, num_image_tokens)
        sample = EncodedSample(ids, labels)
        if max_length is not None and len(ids) > max_length:
            image_positions = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
            sample.truncated = True
            sample.truncated_image = bool(image_positions) and image_positions[-1] >= max_length
            sample.input_ids, sample.labels = ids[:max_length], labels[:max_length]
        return sample

    def encode_prompt(self, conversations: Conversation, tokenizer, num_image_tokens: int) -> List[int]:
        """Ids of a conversation that ends with a human turn, up to and including the assistant cue.

        Exactly the prefix that `encode` produces for the same conversation followed by an answer, so generation
        sees the same ids as training.
        """
        if not conversations or not isinstance(conversations[-1], dict) or conversations[-1].get("from") != HUMAN:
            raise FactoryError(
                f"encode_prompt needs a conversation that ends with a human turn (the question to answer); got "
                f"{len(conversations or [])} turns ending with {str((conversations or [None])[-1])[:80]!r}."
            )
        problem = conversation_problem(list(conversations) + [{"from": ASSISTANT, "value": ""}])
        if problem:
            raise FactoryError(f"Cannot build a prompt with the {self.name!r} template: {problem}.")
        ids, _ = self._render(self.pieces(conversations, prompt_only=True), tokenizer, num_image_tokens)
        return ids

    def _render(self, pieces: List[Piece], tokenizer, num_image_tokens: int) -> Tuple[List[int], List[int]]:
        facts = tokenizer_facts(tokenizer)
        ids: List[int] = []
        labels: List[int] = []
        for kind, text, trained in pieces:
            if kind == "bos":
                piece = list(facts.bos_ids)
            elif kind == "start":
                piece = facts.start(text)
            elif kind == "text":
                piece = facts.continuation(text)
            elif kind == "image":
                if num_image_tokens < 1:
                    raise FactoryError(f"num_image_tokens must be >= 1 for a sample with an image "
                                       f"(got {num_image_tokens}).")
                piece = [IMAGE_TOKEN_INDEX] * num_image_tokens
            elif kind == "eos":
                piece = [facts.eos_id]
            else:  # a template bug, not a user error
                raise ValueError(f"unknown piece kind {kind!r}")
            ids.extend(piece)
            labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))
        return ids, labels


@TEMPLATES.register("plain")
class PlainTemplate(Template):
    """Stage-1 captioning: [BOS] <image tokens> caption "\\n".

    LLaVA's ``plain`` (``preprocess_plain``: the human turn is replaced by the bare ``<image>``, its text dropped;
    then caption + "\\n"; TinyLLaVA's ``pretrain`` is the same). The caption is its own chunk in LLaVA's
    ``tokenizer_image_token``, so it is a ``start`` piece. The loss covers the caption and its closing newline, no
    EOS: the newline is the learned end of a caption (stop generation on it). A text-only sample (LLaVA refuses
    those) is just [BOS] caption "\\n".
    """

    name = "plain"
    encodes_human_text = False

    def pieces(self, conversations: Conversation, prompt_only: bool) -> List[Piece]:
        if len(conversations) > 2:
            raise FactoryError(
                f"The 'plain' (stage-1 captioning) template takes one human turn and one gpt caption; this sample "
                f"has {len(conversations)} turns. Use a chat template (phi, vicuna_v1) for multi-turn data."
            )
        has_image = IMAGE_MARKER in conversations[0]["value"]
        out: List[Piece] = [("bos", None, False)]
        if has_image:
            out.append(("image", None, False))
        if not prompt_only:
            out.append(("start", conversations[1]["value"] + "\n", True))
        return out


class V1Template(Template):
    """LLaVA-1.5 "v1" layout (LLaVA's ``conv_vicuna_v1``, TinyLLaVA's ``phi``):
    `SYSTEM USER: <image>\\nq1 ASSISTANT: a1<eos>USER: q2 ASSISTANT: a2<eos>` - loss on each " aK" + <eos>.

    The space after "ASSISTANT:" belongs to the answer (tokens of " aK"), so a prompt ends at "ASSISTANT:" and the
    model generates the answer with its natural leading space. The image marker is replaced in place by the image
    span (the dataset has already moved it to the front unless ``data.image_first: false``).

    `legacy_chunks` (default True, LLaVA parity): the text after the image and after each ``<eos>`` is tokenized as
    a start of string, as LLaVA's ``tokenizer_image_token`` with its legacy SentencePiece tokenizer did. With the
    Llama tokenizer that gives the space piece 29871 right after the image span and ``▁US ER`` (3148, 1001) after
    each ``</s>``; byte-level BPE (Phi-2) is unaffected. False tokenizes that text as a continuation of the string
    (no space piece after the image, ``USER`` 11889 after ``</s>``): the ids a current tokenizer gives for the whole
    text-only conversation string.
    """

    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
    user, assistant = "USER:", "ASSISTANT:"
    legacy_chunks = True

    def pieces(self, conversations: Conversation, prompt_only: bool) -> List[Piece]:
        restart = "start" if self.legacy_chunks else "text"  # text after the image or after an <eos>
        out: List[Piece] = [("bos", None, False)]
        for i in range(0, len(conversations), 2):
            question = conversations[i]["value"]
            head = f"{self.system} {self.user} " if i == 0 else f"{self.user} "
            before, after = _split_marker(question)
            kind = "start" if i == 0 else restart
            if after is None:
                out.append((kind, f"{head}{question} {self.assistant}", False))
            else:
                out.append((kind, head + before, False))
                out.append(("image", None, False))
                out.append((restart, f"{after} {self.assistant}", False))
            if prompt_only and i + 1 >= len(conversations):
                break
            out.append(("text", " " + conversations[i + 1]["value"], True))
            out.append(("eos", None, True))
        return out


@TEMPLATES.register("phi")
class PhiTemplate(V1Template):
    """Phi-2 chat (TinyLLaVA's `phi`): the v1 layout; the end token is Phi-2's EOS `<|endoftext|>`. Phi-2's byte-level
    BPE has no dummy prefix, so TinyLLaVA's chunked tokenization equals the pieces here with either `legacy_chunks`."""

    name = "phi"


@TEMPLATES.register("vicuna_v1")
class VicunaV1Template(V1Template):
    """Vicuna v1.5 / LLaVA-1.5 `v1`: the v1 layout; the end token is Llama's EOS `</s>` (after the BOS `<s>`).
    Token for token LLaVA-1.5's training and evaluation sequence, space piece after the image included."""

    name = "vicuna_v1"


@TEMPLATES.register("vicuna_v1_natural")
class VicunaV1NaturalTemplate(VicunaV1Template):
    """`vicuna_v1` with `legacy_chunks` off: no space piece after the image span, ``USER`` after ``</s>``. The
    factory's `vicuna_v1` before it matched LLaVA-1.5; use it for checkpoints trained that way."""

    name = "vicuna_v1_natural"
    legacy_chunks = False


def encode_conversation(template: Template, conversations: Conversation, tokenizer, num_image_tokens: int,
                        max_length: Optional[int] = None, image_first: bool = True) -> EncodedSample:
    """A data entry's conversation as training sees it: the image marker moved first (LLaVA's rule) unless
    `image_first` is False, then `template.encode`. The dataset and `python -m factory.data.inspect` both call this."""
    problem = conversation_problem(conversations)
    if problem:
        raise FactoryError(f"Cannot encode a conversation with the {template.name!r} template: {problem}.")
    if image_first:
        conversations = move_image_first(conversations)
    return template.encode(conversations, tokenizer, num_image_tokens, max_length)


def get_template(name: str) -> Template:
    """The registered template `name` (FactoryError listing the known names otherwise)."""
    return TEMPLATES.get(name)()
