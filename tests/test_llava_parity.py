"""Token-for-token parity with LLaVA-1.5 (vicuna_v1, plain + the Llama tokenizer) and TinyLLaVA (phi, pretrain + the
Phi-2 tokenizer), with the real tokenizers in tests/fixtures/tokenizers.

The expected sequences come from a small reference written here that follows the published preprocessing step by
step: LLaVA's `preprocess_multimodal` (image first), `conv_vicuna_v1.get_prompt()`, `tokenizer_image_token` (split
the prompt at <image>, tokenize each chunk, drop the BOS of later chunks, insert -200), `preprocess_v1` /
`preprocess_plain` label masking (rounds split at </s>, instruction lengths from re-tokenizing, "-2"), and
TinyLLaVA's `Template.encode` / `make_labels` for phi and pretrain. LLaVA-1.5 trained with transformers 4.31 and its
slow, legacy SentencePiece tokenizer: every chunk between control tokens is `sentencepiece.encode`d on its own (a
dummy-prefix "▁" in front of it). The reference emulates that by running the tokenizer's BPE model on "▁" + text
(spaces as "▁"), and checks itself against the ids measured with transformers 4.37.2 that the fixture ships.
"""
import json
import re
import types

import pytest
import torch

from factory.constants import IGNORE_INDEX, IMAGE_MARKER, IMAGE_TOKEN_INDEX
from factory.data.templates import V1Template, encode_conversation, get_template, move_image_first

N = 3  # image tokens: LLaVA keeps one -200 in input_ids and expands it in the model; the factory expands it here
SYSTEM = V1Template.system


def turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


# ---------------------------------------------------------------------------------------------- the reference
def llama_legacy_tokenize(tok, text):
    """`tokenizer(text).input_ids` of LLaVA-1.5's tokenizer: BOS, then control tokens as ids and the text between
    them as sentencepiece.encode(part) (dummy prefix on every part)."""
    ids = [tok.bos_token_id]
    for part in re.split(r"(<s>|</s>|<unk>)", text):
        if part in ("<s>", "</s>", "<unk>"):
            ids.append(tok.convert_tokens_to_ids(part))
        elif part:
            ids.extend(token.id for token in tok.backend_tokenizer.model.tokenize("▁" + part.replace(" ", "▁")))
    return ids


def phi_tokenize(tok, text):
    """`tokenizer(text).input_ids` of TinyLLaVA's Phi-2 tokenizer (byte-level BPE, no BOS)."""
    return tok(text).input_ids


def tokenizer_image_token(tokenize, bos_id, prompt):
    chunks = [tokenize(chunk) for chunk in prompt.split(IMAGE_MARKER)]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == bos_id else 0
    ids = [chunks[0][0]] if offset else []
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids


def preprocess_multimodal(conversations):
    out = []
    for turn in conversations:
        value = turn["value"]
        if IMAGE_MARKER in value:
            value = (IMAGE_MARKER + "\n" + value.replace(IMAGE_MARKER, "").strip()).strip()
        out.append({"from": turn["from"], "value": value})
    return out


def v1_prompt(conversations, eos, generation=False):
    """conv_vicuna_v1.get_prompt() (sep " ", sep2 eos); TinyLLaVA's phi template builds the same string."""
    text = SYSTEM + " "
    for turn in conversations:
        role = "USER" if turn["from"] == "human" else "ASSISTANT"
        text += f"{role}: {turn['value']}" + (" " if role == "USER" else eos)
    return text + "ASSISTANT:" if generation else text


def llava_v1(tok, conversations):
    """LLaVA-1.5 preprocess_v1 (tokenizers < 0.14, as LLaVA-1.5 pinned): (input_ids, labels)."""
    conversations = preprocess_multimodal(conversations)
    has_image = IMAGE_MARKER in conversations[0]["value"]
    prompt = v1_prompt(conversations, "</s>")

    def tokenize(text):
        return (tokenizer_image_token(lambda c: llama_legacy_tokenize(tok, c), tok.bos_token_id, text) if has_image
                else llama_legacy_tokenize(tok, text))

    input_ids = tokenize(prompt)
    target = list(input_ids)
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX]
    for rou in prompt.split("</s>"):
        if rou == "":
            break
        parts = rou.split(" ASSISTANT: ")
        if len(parts) != 2:
            break
        parts[0] += " ASSISTANT: "
        round_len, instruction_len = len(tokenize(rou)), len(tokenize(parts[0])) - 2
        target[cur_len:cur_len + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * (len(target) - cur_len)
    assert cur_len == len(input_ids), "LLaVA would warn 'tokenization mismatch' and drop every label"
    return input_ids, target


def tinyllava_phi(tok, conversations):
    """TinyLLaVA phi template: Template.encode + make_labels (pad = eos = <|endoftext|>): (input_ids, labels)."""
    conversations = preprocess_multimodal(conversations)
    eos = "<|endoftext|>"
    prompt = v1_prompt(conversations, eos)

    def tokenize(text):
        return tokenizer_image_token(lambda c: phi_tokenize(tok, c), tok.bos_token_id, text)

    input_ids = tokenize(prompt)
    labels = list(input_ids)
    total_len = sum(t != tok.eos_token_id for t in input_ids) + prompt.count(eos)
    cur_len = 0
    for rou in prompt.split(eos):
        if rou == "":
            break
        parts = rou.split(" ASSISTANT: ")
        if len(parts) != 2:
            break
        parts[0] += " ASSISTANT: "
        round_len = len(tokenize(rou)) + len(tok.encode(eos))
        instruction_len = len(tokenize(parts[0])) - 1
        labels[cur_len:cur_len + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur_len += round_len
    labels[cur_len:] = [IGNORE_INDEX] * (len(labels) - cur_len)
    assert cur_len == total_len, "TinyLLaVA would warn 'tokenization mismatch' and drop every label"
    return input_ids, labels


def pretrain(tok, conversations, tokenize):
    """LLaVA preprocess_plain / TinyLLaVA pretrain: '<image>' + caption + '\\n', the image part masked."""
    prompt = IMAGE_MARKER + conversations[1]["value"] + "\n"
    input_ids = tokenizer_image_token(tokenize, tok.bos_token_id, prompt)
    masked = len(tokenizer_image_token(tokenize, tok.bos_token_id, IMAGE_MARKER))
    return input_ids, [IGNORE_INDEX] * masked + input_ids[masked:]


def expand_image(ids, labels):
    """LLaVA's one -200 position becomes the N image positions the model fills (labels masked there)."""
    out_ids, out_labels = [], []
    for token, label in zip(ids, labels):
        count = N if token == IMAGE_TOKEN_INDEX else 1
        out_ids += [token] * count
        out_labels += [IGNORE_INDEX if token == IMAGE_TOKEN_INDEX else label] * count
    return out_ids, out_labels


# ------------------------------------------------------------------------------------------------------ cases
CASES = {
    "image first": turns("<image>\nWhat is shown in the picture?", "A red circle on a white background."),
    "image last": turns("What is shown in the picture?\n<image>", "A red circle on a white background."),
    "image mid-text": turns("Look at this: <image> Which colour is the circle?", "Red."),
    "multi-turn": turns("<image>\nWhat shape is it?", "A circle.", "What colour?", "Red, mostly.",
                        "Anything else?  ", " No, nothing else."),
    "text only": turns("Hi there!", "Hello! How can I help?", "Name a colour.", "Blue"),
    "code and whitespace": turns("Fix:\n    return  x\n\tdone", "def f():\n    return 1\n"),
}


@pytest.fixture(params=["vicuna_v1", "phi"])
def model(request, llama_tok, phi_tok):
    if request.param == "vicuna_v1":
        return get_template("vicuna_v1"), llama_tok, llava_v1
    return get_template("phi"), phi_tok, tinyllava_phi


def test_reference_reproduces_the_measured_llava_tokenizer(real_tokenizers, llama_tok):
    """The reference's legacy tokenizer gives the ids measured with transformers 4.37.2 (slow, legacy=True) and
    LLaVA's own tokenizer_image_token output stored in the fixture."""
    expected = json.loads((real_tokenizers / "llama" / "expected.json").read_text())
    measured = expected["more_probes"]["transformers_4.37.2_LlamaTokenizer_slow_legacy=True (LLaVA-1.5 pin, "
                                       "default legacy)"]
    for text, ids in measured.items():
        assert llama_legacy_tokenize(llama_tok, text) == ids, text
    text = expected["text"]
    assert tokenizer_image_token(lambda c: llama_legacy_tokenize(llama_tok, c), 1, text) == \
        expected["common"]["llava_tokenizer_image_token"]


@pytest.mark.parametrize("case", list(CASES))
def test_training_sequence_equals_the_reference(model, case):
    template, tok, reference = model
    conversations = CASES[case]
    ids, labels = expand_image(*reference(tok, conversations))
    sample = encode_conversation(template, conversations, tok, N)  # the dataset's path, image_first by default
    assert sample.input_ids == ids
    assert sample.labels == labels


def test_the_space_piece_after_the_image(llama_tok, phi_tok):
    """LLaVA-1.5: the chunk after <image> starts with '▁' (29871) before the newline (13); the chunk before ends
    with the lone '▁' of "USER: ". Phi-2 has no dummy prefix: the newline (198) follows the image directly."""
    conv = turns("<image>\nWhat is this?", "A cat.")
    ids = encode_conversation(get_template("vicuna_v1"), conv, llama_tok, N).input_ids
    start = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[start - 4:start] == [3148, 1001, 29901, 29871] and ids[start + N:start + N + 3] == [29871, 13, 5618]
    natural = encode_conversation(get_template("vicuna_v1_natural"), conv, llama_tok, N).input_ids
    assert natural[start + N:start + N + 2] == [13, 5618] and len(natural) == len(ids) - 1
    phi = encode_conversation(get_template("phi"), conv, phi_tok, N).input_ids
    start = phi.index(IMAGE_TOKEN_INDEX)
    assert phi[start - 1] == 220 and phi[start + N:start + N + 2] == [198, 2061]


def test_multi_turn_restarts_after_each_eos(llama_tok):
    """After </s> LLaVA-1.5's legacy tokenizer starts a new SentencePiece string: "USER" is ▁US ER (3148, 1001),
    not the 'USER' (11889) a current tokenizer gives in the middle of a string (vicuna_v1_natural keeps that)."""
    conv = CASES["multi-turn"]
    ids = encode_conversation(get_template("vicuna_v1"), conv, llama_tok, N).input_ids
    after_eos = [ids[i + 1:i + 4] for i, t in enumerate(ids[:-1]) if t == 2]
    assert after_eos == [[3148, 1001, 29901]] * 2
    natural = encode_conversation(get_template("vicuna_v1_natural"), conv, llama_tok, N).input_ids
    assert [natural[i + 1:i + 3] for i, t in enumerate(natural[:-1]) if t == 2] == [[11889, 29901]] * 2


@pytest.mark.parametrize("case", ["image first", "image last", "multi-turn"])
def test_eval_prompt_equals_llava_eval_prompt(model, case):
    """LLaVA's model_vqa: '<image>\\n' + question, conv.get_prompt() ending in 'ASSISTANT:', tokenizer_image_token;
    the factory's eval builds its conversation with the same image-first rule (factory.eval.generate)."""
    from factory.eval.generate import conversation_for

    template, tok, _ = model
    conversations = CASES[case]
    question = conversations[-2]["value"] if case == "multi-turn" else conversations[0]["value"]
    history = conversations[:-2] if case == "multi-turn" else []
    if not history:
        conv = conversation_for({"text": question.replace(IMAGE_MARKER, ""), "image": "x.png"})
    else:
        conv = move_image_first(history) + [{"from": "human", "value": question}]
    eos = tok.eos_token
    prompt = v1_prompt(preprocess_multimodal(conv), eos, generation=True)
    if template.name == "vicuna_v1":
        expected = tokenizer_image_token(lambda c: llama_legacy_tokenize(tok, c), tok.bos_token_id, prompt)
    else:
        expected = tokenizer_image_token(lambda c: phi_tokenize(tok, c), tok.bos_token_id, prompt)
    assert template.encode_prompt(conv, tok, N) == expand_image(expected, expected)[0]


@pytest.mark.parametrize("caption", ["A small red circle in the top left corner.", " A caption with a leading space",
                                     "two  spaces\tand a tab"])
def test_pretrain_captions_equal_the_reference(llama_tok, phi_tok, caption):
    """plain: the human text is dropped (LLaVA keeps only <image>), caption + '\\n' trained, no EOS."""
    conv = turns("Describe the image briefly.\n<image>", caption)
    plain = get_template("plain")
    for tok, tokenize in ((llama_tok, lambda c: llama_legacy_tokenize(llama_tok, c)),
                          (phi_tok, lambda c: phi_tokenize(phi_tok, c))):
        ids, labels = expand_image(*pretrain(tok, conv, tokenize))
        sample = encode_conversation(plain, conv, tok, N)
        assert (sample.input_ids, sample.labels) == (ids, labels)


# ------------------------------------------------------------------------------------------------ text is text
@pytest.mark.parametrize("name", ["vicuna_v1", "vicuna_v1_natural", "phi", "plain"])
def test_control_token_strings_in_text_are_plain_text(name, llama_tok, phi_tok):
    """'</s>', '<|endoftext|>', '<s>', '<unk>' written in a question or an answer are ordinary characters: the only
    control ids are the template's own BOS / EOS, and the answer decodes back to the exact text."""
    tok = phi_tok if name == "phi" else llama_tok
    template = get_template(name)
    answer = "Say </s> or <|endoftext|> then <s><unk> and stop.</s>"
    question = "<image>\nWhat does </s> mean? <|endoftext|>"
    conv = turns(question, answer) if name == "plain" else turns(question, answer, "Again </s>?", answer)
    sample = encode_conversation(template, conv, tok, N)
    control = {tok.eos_token_id, tok.bos_token_id, tok.unk_token_id}
    found = [t for t in sample.input_ids if t in control]
    expected_eos = 0 if name == "plain" else 2
    assert found == ([tok.bos_token_id] if tok is llama_tok else []) + [tok.eos_token_id] * expected_eos
    trained = [t for t in sample.labels if t != IGNORE_INDEX]
    text = tok.decode(trained)
    assert text.count(answer) == (1 if name == "plain" else 2)


# ------------------------------------------------------------------------------- one prompt: train, eval, chat
class PromptRecorder(torch.nn.Module):
    """Stands in for a LlavaModel in eval and chat: records the prompt ids it is asked to continue, answers "Red"."""

    def __init__(self, tok, template):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.template, self.image_token_count = tok, template, N
        self.vision = types.SimpleNamespace(dtype=torch.float32, image_transform=lambda image: torch.zeros(3, 2, 2))
        self.prompts = []

    def generate(self, input_ids, attention_mask, pixel_values, max_new_tokens, eos_token_id):
        self.prompts.append(input_ids[0][attention_mask[0].bool()].tolist())
        return [self.tokenizer.encode(" Red", add_special_tokens=False) + [self.tokenizer.eos_token_id]]


@pytest.mark.parametrize("name", ["vicuna_v1", "phi"])
def test_training_eval_and_chat_build_the_same_prompt(name, llama_tok, phi_tok, tmp_path):
    """One question with <image> after it in the training JSON and in the eval question file, and typed in chat:
    eval and chat prompt with exactly the ids of the training sequence up to 'ASSISTANT:'."""
    from PIL import Image

    from factory.eval.chat import ChatSession
    from factory.eval.generate import answer_questions

    tok = llama_tok if name == "vicuna_v1" else phi_tok
    question = "Which colour is the circle?"
    training = encode_conversation(get_template(name), turns(f"{question}\n<image>", "Red"), tok, N).input_ids
    model = PromptRecorder(tok, name)
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    assert answer_questions(model, [{"text": f"{question}\n<image>", "image": "x.png"}], tmp_path, 4) == ["Red"]
    assert ChatSession(model, str(tmp_path / "x.png"), max_new_tokens=4).ask(question) == "Red"
    eval_prompt, chat_prompt = model.prompts
    assert eval_prompt == chat_prompt == training[:len(eval_prompt)]
    assert training[len(eval_prompt):] == tok.encode(" Red", add_special_tokens=False) + [tok.eos_token_id]
