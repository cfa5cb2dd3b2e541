"""Chat templates: ids and label masks token by token with the real Phi-2 and Llama/Vicuna tokenizers."""
import pytest

from factory.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from factory.data.templates import V1Template, get_template
from factory.errors import FactoryError

N = 5  # image tokens
SYSTEM = V1Template.system


def turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def labelled_runs(labels):
    """Contiguous runs of trained label ids."""
    runs, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


@pytest.fixture(params=["phi", "vicuna_v1"])
def setup(request):
    """(template, tokenizer) pairs as used in training: phi + Phi-2 tokenizer, vicuna_v1 + Llama tokenizer."""
    tok = request.getfixturevalue("phi_tok" if request.param == "phi" else "llama_tok")
    return get_template(request.param), tok


# "\nWhat is this? ASSISTANT:" after the image and " A cat." + EOS, as LLaVA's tokenizer_image_token gives them
# (tests/fixtures/tokenizers/*/expected.json, measured with transformers 4.37.2): the Llama chunk after the image
# starts with the SentencePiece space piece 29871.
EXPECTED_TAIL = {
    "phi": ([198, 2061, 318, 428, 30, 24994, 8808, 8643, 25], [317, 3797, 13, 50256]),
    "vicuna_v1": ([29871, 13, 5618, 338, 445, 29973, 319, 1799, 9047, 13566, 29901], [319, 6635, 29889, 2]),
}
# BOS and the lone space token that "USER: " ends with before the image (as in LLaVA's tokenizer_image_token).
EXPECTED_EDGES = {"phi": ([], 220), "vicuna_v1": ([1], 29871)}


def test_single_turn_image_first_token_by_token(setup):
    template, tok = setup
    sample = template.encode(turns("<image>\nWhat is this?", "A cat."), tok, N)
    bos, space = EXPECTED_EDGES[template.name]
    question, answer = EXPECTED_TAIL[template.name]
    head = sample.input_ids[:sample.input_ids.index(IMAGE_TOKEN_INDEX)]
    assert head[:len(bos)] == bos and head[-1] == space
    assert head == bos + tok.encode(f"{SYSTEM} USER: ", add_special_tokens=False)
    assert sample.input_ids == head + [IMAGE_TOKEN_INDEX] * N + question + answer
    assert sample.labels == [IGNORE_INDEX] * (len(head) + N + len(question)) + answer
    assert not sample.truncated_image and not sample.truncated


def test_image_last_is_replaced_in_place(setup):
    template, tok = setup
    sample = template.encode(turns("What is this?\n<image>", "A cat."), tok, N)
    ids = sample.input_ids
    start = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[start:start + N] == [IMAGE_TOKEN_INDEX] * N and ids.count(IMAGE_TOKEN_INDEX) == N
    bos, _ = EXPECTED_EDGES[template.name]
    assert ids[:start] == bos + tok.encode(f"{SYSTEM} USER: What is this?\n", add_special_tokens=False)
    answer = EXPECTED_TAIL[template.name][1]
    after = ids[start + N:]
    assert tok.decode(after[:-len(answer)]).strip() == "ASSISTANT:"
    assert after[-len(answer):] == answer
    assert labelled_runs(sample.labels) == [answer]


@pytest.mark.parametrize("name", ["phi", "vicuna_v1_natural"])
def test_text_only_multi_turn_equals_whole_string_tokenization(name, phi_tok, llama_tok):
    """Piecewise ids are the tokenizer's own ids for the whole conversation string: the pieces never merge.
    (vicuna_v1 itself follows LLaVA-1.5's legacy tokenizer after each </s>: tests/test_llava_parity.py.)"""
    template, tok = get_template(name), (phi_tok if name == "phi" else llama_tok)
    conv = turns("Hi there", "Hello! How can I help?", "Name a colour.", "Blue", "Another one?", "Red, or green.")
    sample = template.encode(conv, tok, N)
    eos = tok.eos_token
    text = (f"{SYSTEM} USER: Hi there ASSISTANT: Hello! How can I help?{eos}USER: Name a colour. ASSISTANT: Blue{eos}"
            f"USER: Another one? ASSISTANT: Red, or green.{eos}")
    assert sample.input_ids == tok.encode(text, add_special_tokens=True)
    assert IMAGE_TOKEN_INDEX not in sample.input_ids
    runs = labelled_runs(sample.labels)
    assert len(runs) == 3
    for run, answer in zip(runs, ["Hello! How can I help?", "Blue", "Red, or green."]):
        # each run is exactly the natural tokens of " answer" followed by the end token
        assert run == tok.encode(text[text.index(" " + answer):], add_special_tokens=False)[:len(run) - 1] + [
            tok.eos_token_id]
        assert tok.decode(run).lstrip() == answer + eos


def test_multi_turn_with_image_labels_only_answers(setup):
    template, tok = setup
    conv = turns("<image>\nWhat shape is it?", "A red circle.", "How many?", "Two", "Where?", "Top left.")
    sample = template.encode(conv, tok, N)
    assert len(sample.input_ids) == len(sample.labels)
    assert sample.input_ids.count(IMAGE_TOKEN_INDEX) == N
    for token, label in zip(sample.input_ids, sample.labels):
        assert label in (IGNORE_INDEX, token)  # a label is either masked or the token itself
    runs = labelled_runs(sample.labels)
    assert [tok.decode(run).lstrip() for run in runs] == [a + tok.eos_token for a in ("A red circle.", "Two",
                                                                                       "Top left.")]
    assert sum(len(run) for run in runs) == sum(label != IGNORE_INDEX for label in sample.labels)
    # the question turns (and the image) carry no loss
    masked = [t for t, lab in zip(sample.input_ids, sample.labels) if lab == IGNORE_INDEX and t >= 0]
    assert "How many?" in tok.decode(masked) and "Where?" in tok.decode(masked)
    assert "Top left" not in tok.decode(masked)


@pytest.mark.parametrize("first", ["<image>\nWhat shape is it?", "What shape is it?\n<image>", "What shape is it?"])
def test_prompt_is_prefix_of_training_encoding(setup, first):
    template, tok = setup
    conv = turns(first, "A red circle.", "How many?", "Two")
    full = template.encode(conv, tok, N)
    for k in (1, 3):
        prompt = template.encode_prompt(conv[:k], tok, N)
        assert full.input_ids[:len(prompt)] == prompt
        assert tok.decode([t for t in prompt[-6:] if t >= 0]).endswith("ASSISTANT:")
        assert full.labels[len(prompt) - 1] == IGNORE_INDEX and full.labels[len(prompt)] != IGNORE_INDEX


def test_prompt_needs_a_final_human_turn(setup):
    template, tok = setup
    with pytest.raises(FactoryError, match="ends with a human turn"):
        template.encode_prompt(turns("q", "a"), tok, N)


def test_plain_template(setup):
    _, tok = setup
    plain = get_template("plain")
    sample = plain.encode(turns("<image>\nDescribe the image briefly.", "A red circle."), tok, N)
    bos, _ = EXPECTED_EDGES["phi" if tok.bos_token_id != 1 else "vicuna_v1"]
    caption = tok.encode("A red circle.\n", add_special_tokens=False)
    assert sample.input_ids == bos + [IMAGE_TOKEN_INDEX] * N + caption
    assert sample.labels == [IGNORE_INDEX] * (len(bos) + N) + caption
    assert tok.decode(labelled_runs(sample.labels)[0]).lstrip() == "A red circle.\n"
    assert plain.encode_prompt(turns("<image>\nDescribe."), tok, N) == bos + [IMAGE_TOKEN_INDEX] * N
    text_only = plain.encode(turns("Describe.", "Plain text."), tok, N)
    assert IMAGE_TOKEN_INDEX not in text_only.input_ids
    assert tok.decode(labelled_runs(text_only.labels)[0]).lstrip() == "Plain text.\n"
    with pytest.raises(FactoryError, match="one human turn"):
        plain.encode(turns("<image>\nq", "a", "q2", "a2"), tok, N)


def test_truncation(setup):
    template, tok = setup
    conv = turns("<image>\nWhat shape is it?", "A red circle with a thin black border.")
    full = template.encode(conv, tok, N)
    image_end = max(i for i, t in enumerate(full.input_ids) if t == IMAGE_TOKEN_INDEX) + 1
    kept = template.encode(conv, tok, N, max_length=image_end)  # the image just fits: text after it is cut
    assert kept.truncated and not kept.truncated_image
    assert kept.input_ids == full.input_ids[:image_end] and kept.labels == full.labels[:image_end]
    cut = template.encode(conv, tok, N, max_length=image_end - 1)
    assert cut.truncated_image
    text = template.encode(turns("Tell me a story.", "Once upon a time there was a shape."), tok, N, max_length=40)
    assert len(text.input_ids) == len(text.labels) == 40 and text.truncated and not text.truncated_image
    untouched = template.encode(conv, tok, N, max_length=len(full.input_ids))
    assert untouched.input_ids == full.input_ids and not untouched.truncated


@pytest.mark.parametrize("conv, message", [
    (turns("<image>\nq", "a", "<image>\nq2", "a2"), "may only appear in the first human turn"),
    (turns("<image><image>\nq", "a"), "2 times"),
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}], "alternate"),
    ([{"from": "user", "value": "q"}, {"from": "gpt", "value": "a"}], "roles must be"),
    (turns("q"), "ends with a human turn"),
    ([], "non-empty"),
])
def test_bad_conversations_raise(conv, message):
    from factory.testing import tiny_tokenizer

    with pytest.raises(FactoryError, match=message):
        get_template("phi").encode(conv, tiny_tokenizer(), N)


def test_unknown_template_lists_known_names():
    from factory.registry import TEMPLATES

    assert {"plain", "phi", "vicuna_v1"} <= set(TEMPLATES.names())
    assert isinstance(get_template("phi"), TEMPLATES.get("phi"))
    with pytest.raises(FactoryError) as err:
        get_template("vicuna")
    assert "vicuna_v1" in str(err.value) and "plain" in str(err.value)


@pytest.mark.parametrize("name", ["phi", "vicuna_v1", "plain"])
def test_tiny_tokenizer_without_shared_fixtures(name):
    from factory.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    template = get_template(name)
    conv = turns("What is in the image?\n<image>", "A red circle.") if name == "plain" else turns(
        "<image>\nWhat is in the image?", "A red circle.", "How many shapes are there?", "There are three shapes.")
    sample = template.encode(conv, tok, 4)
    assert sample.input_ids.count(IMAGE_TOKEN_INDEX) == 4
    start = sample.input_ids.index(IMAGE_TOKEN_INDEX)
    assert sample.input_ids[start:start + 4] == [IMAGE_TOKEN_INDEX] * 4
    assert all(0 <= t < len(tok) for t in sample.input_ids if t != IMAGE_TOKEN_INDEX)
    decoded = [tok.decode(run) for run in labelled_runs(sample.labels)]
    if name == "plain":
        assert decoded == ["A red circle.\n"]
    else:
        assert decoded == [" A red circle.</s>", " There are three shapes.</s>"]
        prompt = template.encode_prompt(conv[:3], tok, 4)
        assert sample.input_ids[:len(prompt)] == prompt
        assert tok.decode(sample.input_ids[len(prompt):]) == " There are three shapes.</s>"


def test_legacy_loaded_llama_tokenizer_gives_the_same_ids(real_tokenizers, llama_tok):
    """A Llama tokenizer loaded with legacy=True (LLaVA-1.5's setting; transformers then re-adds the dummy prefix after
    control tokens) gives the very same ids as the default one: the template, not the tokenizer flag, decides."""
    from transformers import AutoTokenizer

    legacy = AutoTokenizer.from_pretrained(str(real_tokenizers / "llama"), legacy=True)
    assert legacy.encode("</s>a", add_special_tokens=False) == [2, 263]  # the flag really changes the tokenizer
    assert llama_tok.encode("</s>a", add_special_tokens=False) == [2, 29874]
    template = get_template("vicuna_v1")
    conv = turns("<image>\nWhat is this?", "A cat.", "And this?", "A dog.")
    sample = template.encode(conv, legacy, N)
    assert sample.input_ids == template.encode(conv, llama_tok, N).input_ids
    assert labelled_runs(sample.labels) == [[319, 6635, 29889, 2], [319, 11203, 29889, 2]]
    prompt = template.encode_prompt(conv[:3], legacy, N)
    assert sample.input_ids[:len(prompt)] == prompt
    # text-only: LLaVA's sequence is what the legacy tokenizer gives for the whole string ("</s>USER" -> ▁US ER)
    text = turns("Hi there", "Hello!", "Name a colour.", "Blue")
    whole = f"{SYSTEM} USER: Hi there ASSISTANT: Hello!</s>USER: Name a colour. ASSISTANT: Blue</s>"
    assert template.encode(text, llama_tok, N).input_ids == legacy.encode(whole)
