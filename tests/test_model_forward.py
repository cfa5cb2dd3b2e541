"""LlavaModel forward / embed / generate / trainable weights on tiny random models."""
import pytest
import torch
import torch.nn.functional as F

from factory.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX as IMG
from factory.errors import FactoryError
from factory.testing import tiny_model

N = 16  # image tokens of the tiny encoders (32 px / 8 px patches)
PAD = 3


@pytest.fixture(scope="module", params=["phi", "llama"])
def model(request):
    return tiny_model(llm=request.param, vision="hf_clip" if request.param == "phi" else "hf_siglip").eval()


def pad_batch(rows, side):
    """Pad token-id lists to one length; returns input_ids and attention_mask."""
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        fill = [PAD] * (width - len(r))
        ids.append(fill + r if side == "left" else r + fill)
        mask.append([0] * len(fill) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * len(fill))
    return torch.tensor(ids), torch.tensor(mask)


# three samples: image at different offsets, one text-only sample in the middle
ROWS = [[5, 6] + [IMG] * N + [7, 8, 9], [10, 11, 12, 13, 14], [20, 21, 22, 23, 24, 25] + [IMG] * N + [30]]
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("side", ["left", "right"])
def test_image_span_placement(model, side):
    ids, mask = pad_batch(ROWS, side)
    embeds = model.embed(ids, IMAGES)
    with torch.no_grad():
        features = model.connector(model.vision.encode(IMAGES))
    tokens = model.llm.get_input_embeddings()(ids.clamp(min=0))
    image_rows = [0, 2]
    for k, row in enumerate(image_rows):
        positions = (ids[row] == IMG).nonzero().flatten()
        assert len(positions) == N and int(positions[-1] - positions[0]) == N - 1
        torch.testing.assert_close(embeds[row, positions], features[k])
        text = ids[row] != IMG
        torch.testing.assert_close(embeds[row, text], tokens[row, text])
    torch.testing.assert_close(embeds[1], tokens[1])
    assert not torch.allclose(features[0], features[1])


def test_forward_shapes_and_loss(model):
    ids, mask = pad_batch(ROWS, "right")
    labels = ids.clone()
    labels[(ids == IMG) | (mask == 0)] = IGNORE_INDEX
    labels[:, :3] = IGNORE_INDEX
    out = model(ids, mask, IMAGES, labels=labels)
    assert out.logits.shape == (3, ids.shape[1], 512)
    # mean over every label token of the batch (not a mean of per-sample means)
    shift_logits, shift_labels = out.logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1)
    expected = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    expected = expected / (shift_labels != IGNORE_INDEX).sum()
    torch.testing.assert_close(out.loss, expected)
    assert out.loss.dtype == torch.float32


def test_wrong_number_of_image_tokens(model):
    ids = torch.tensor([[5] + [IMG] * (N - 1) + [6]])
    with pytest.raises(FactoryError, match=f"15 image-token positions.*1 image.*{N}"):
        model(ids, torch.ones_like(ids), IMAGES[:1])
    ids = torch.tensor([[5] + [IMG] * N + [6]])
    with pytest.raises(FactoryError, match="0 image"):
        model(ids, torch.ones_like(ids))


def test_left_padded_batch_equals_single_samples(model):
    ids, mask = pad_batch(ROWS, "left")
    batched = model(ids, mask, IMAGES).logits
    images = [IMAGES[:1], None, IMAGES[1:]]
    for i, row in enumerate(ROWS):
        single = model(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), images[i]).logits[0]
        torch.testing.assert_close(batched[i, -len(row):], single, atol=1e-4, rtol=1e-4)


def greedy_without_cache(model, row, image, steps, eos=None):
    tokens = list(row)
    new = []
    for _ in range(steps):
        ids = torch.tensor([tokens])
        token = int(model(ids, torch.ones_like(ids), image).logits[0, -1].argmax())
        if token == eos:
            break
        new.append(token)
        tokens.append(token)
    return new


def until(tokens, eos):
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_generate_equals_stepwise_argmax(model):
    images = [IMAGES[:1], None, IMAGES[1:]]
    expected = [greedy_without_cache(model, row, images[i], 6) for i, row in enumerate(ROWS)]
    eos = expected[1][2]  # stop sample 1 at its third token; the others stop wherever they produce it
    for side in ("left", "right"):
        ids, mask = pad_batch(ROWS, side)
        got = model.generate(ids, mask, IMAGES, max_new_tokens=6, eos_token_id=-1)
        assert got == expected and all(len(g) == 6 for g in got)
        got = model.generate(ids, mask, IMAGES, max_new_tokens=6, eos_token_id=eos)
        assert got[1] == expected[1][:2]
        assert got == [until(e, eos) for e in expected]


def test_observers_see_image_mask_then_all_false(model):
    seen = []

    class Observer:
        def observe_batch(self, image_mask, attention_mask, labels=None):
            seen.append((image_mask.clone(), attention_mask.clone()))

    model.batch_observers.append(Observer())
    try:
        ids, mask = pad_batch(ROWS, "left")
        model.generate(ids, mask, IMAGES, max_new_tokens=3, eos_token_id=-1)
    finally:
        model.batch_observers.clear()
    assert len(seen) == 3
    assert torch.equal(seen[0][0], ids == IMG) and torch.equal(seen[0][1], mask)
    for step, (image_mask, attention_mask) in enumerate(seen[1:], start=1):
        assert image_mask.shape == (3, 1) and not image_mask.any()
        assert attention_mask.shape == (3, ids.shape[1] + step)


def test_frozen_vision_runs_without_autograd():
    model = tiny_model()
    grad_modes = []
    first_block = getattr(model.vision.model, "vision_model", model.vision.model).encoder.layers[0]
    first_block.register_forward_hook(lambda m, i, o: grad_modes.append(torch.is_grad_enabled()))
    ids, mask = pad_batch(ROWS, "right")
    model.vision.requires_grad_(False)
    model(ids, mask, IMAGES, labels=ids.clamp(min=0)).loss.backward()
    assert grad_modes == [False]
    assert next(model.connector.parameters()).grad is not None
    model.vision.requires_grad_(True)
    model(ids, mask, IMAGES, labels=ids.clamp(min=0)).loss.backward()
    assert grad_modes == [False, True]
    assert first_block.mlp.fc1.weight.grad is not None


def test_trainable_state_dict_round_trip():
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    for m in (source, target):
        m.requires_grad_(False)
        m.connector.requires_grad_(True)
    state = source.trainable_state_dict()
    assert set(state) == {f"connector.{n}" for n, _ in source.connector.named_parameters()}
    ids, mask = pad_batch(ROWS, "right")
    with torch.no_grad():
        for p in source.connector.parameters():
            p.add_(0.1)
    target.load_trainable_state_dict(source.trainable_state_dict())
    # vision and LLM are seeded differently, so copy them to compare the whole output
    target.vision.load_state_dict(source.vision.state_dict())
    target.llm.load_state_dict(source.llm.state_dict())
    torch.testing.assert_close(target(ids, mask, IMAGES).logits, source(ids, mask, IMAGES).logits)
    broken = dict(state)
    broken.pop("connector.0.weight")
    broken["connector.9.weight"] = torch.zeros(1)
    with pytest.raises(FactoryError, match="missing: connector.0.weight; unexpected: connector.9.weight"):
        target.load_trainable_state_dict(broken)
