"""MoReS: the formula, the orthogonality constraint, positions, locality of the steering, gradients, generation."""
import pytest
import torch

from factory.constants import IMAGE_TOKEN_INDEX
from factory.errors import FactoryError
from factory.testing import tiny_model
from factory.tuners import apply_tuning
from factory.tuners.mores import MoReS, MoReSIntervention
from factory.tuners.mores_positions import parse_layers, parse_positions, select_positions

MORES = {"name": "mores", "rank": 1, "layers": "all", "positions": "f4+l5", "modality": "vision", "dropout": 0.0}


def make_batch(model, offsets=(2, 7), length=40, pad_left=(False, True), with_image=(True, True), seed=0):
    """Samples with their image span at different offsets, right or left padding, optionally no image."""
    gen = torch.Generator().manual_seed(seed)
    n = model.image_token_count
    rows, masks = [], []
    for offset, left, image in zip(offsets, pad_left, with_image):
        real = length - 6
        ids = torch.randint(5, 500, (real,), generator=gen)
        if image:
            ids[offset:offset + n] = IMAGE_TOKEN_INDEX
        pad = torch.full((length - real,), 3)
        ids = torch.cat([pad, ids]) if left else torch.cat([ids, pad])
        mask = torch.cat([torch.zeros(length - real), torch.ones(real)]) if left else \
            torch.cat([torch.ones(real), torch.zeros(length - real)])
        rows.append(ids)
        masks.append(mask.long())
    ids, mask = torch.stack(rows), torch.stack(masks)
    pixels = torch.randn(sum(with_image), 3, 32, 32, generator=gen) if any(with_image) else None
    labels = torch.where(mask.bool() & (ids >= 0), ids, torch.full_like(ids, -100))
    return ids, mask, pixels, labels


def orthonormality_error(rot):
    eye = torch.eye(rot.shape[1], dtype=rot.dtype)
    return float((rot.t() @ rot - eye).abs().max().detach())


def test_formula_matches_direct_computation():
    torch.manual_seed(0)
    module = MoReSIntervention(hidden=24, rank=3, dropout=0.5).eval()
    h = torch.randn(7, 24)
    rot = module.rotate.weight  # torch's parametrized R
    weight, bias = module.project.weight, module.project.bias
    expected = h + (h @ weight.t() + bias - h @ rot) @ rot.t()
    assert torch.allclose(module(h), expected, atol=1e-6)
    assert torch.allclose(module.rotation(), rot)
    assert orthonormality_error(rot) < 1e-5
    assert float((weight.abs()).sum()) > 0  # default init, not zero: MoReS is not the identity at step 0
    assert not torch.allclose(module(h), h)
    # the same map written per row with an explicit orthonormal basis
    for i in range(7):
        row = h[i]
        steer = sum(rot[:, j] * (weight[j] @ row + bias[j] - rot[:, j] @ row) for j in range(3))
        assert torch.allclose(module(h[i:i + 1])[0], row + steer, atol=1e-5)


def test_dropout_only_in_training():
    module = MoReSIntervention(hidden=16, rank=1, dropout=0.5)
    h = torch.randn(50, 16)
    module.train()
    assert not torch.equal(module(h), module(h))
    module.eval()
    assert torch.equal(module(h), module(h))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_stays_orthonormal_under_training(dtype):
    model = tiny_model(llm="phi").to(dtype)
    apply_tuning(model, {**MORES, "rank": 2})
    mores = model.llm.mores
    assert all(p.dtype == torch.float32 for p in mores.parameters())  # fp32 even in a bf16 model
    before = {k: m.rotation().detach().clone() for k, m in mores.interventions.items()}
    for rot in before.values():
        assert orthonormality_error(rot) < 1e-5
    ids, mask, pixels, labels = make_batch(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.1)
    for _ in range(4):
        loss = model(ids, mask, pixels.to(dtype), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for key, m in mores.interventions.items():
        rot = m.rotation()
        assert rot.dtype == torch.float32
        assert orthonormality_error(rot) < 1e-5
        assert (rot - before[key]).abs().max() > 1e-3  # R did train


def test_positions_first_last_with_offsets_padding_and_text_only():
    image_mask = torch.zeros(4, 40, dtype=torch.bool)
    attention = torch.ones(4, 40, dtype=torch.long)
    image_mask[0, 2:18] = True  # right padded
    attention[0, 34:] = 0
    image_mask[1, 12:28] = True  # left padded
    attention[1, :6] = 0
    image_mask[3, 30:36] = True  # a short span (6 < 4 + 5): every token once
    positions = select_positions(image_mask, attention, parse_positions("f4+l5"))
    assert positions.shape == (4, 9)
    assert positions[0].tolist() == [2, 3, 4, 5, 13, 14, 15, 16, 17]
    assert positions[1].tolist() == [12, 13, 14, 15, 23, 24, 25, 26, 27]
    assert positions[2].tolist() == [-1] * 9  # no image: nothing steered
    assert positions[3].tolist() == [30, 31, 32, 33, 34, 35, -1, -1, -1]
    assert select_positions(image_mask, attention, parse_positions("f2"))[1].tolist() == [12, 13]
    assert select_positions(image_mask, attention, parse_positions("l3"))[0].tolist() == [15, 16, 17]


@pytest.mark.parametrize("ratio,expected_count", [(0.01, 1), (0.25, 4), (0.5, 8), (1.0, 16)])
def test_positions_ratio(ratio, expected_count):
    image_mask = torch.zeros(2, 30, dtype=torch.bool)
    image_mask[0, 3:19] = True
    image_mask[1, 10:26] = True
    positions = select_positions(image_mask, None, parse_positions(f"ratio={ratio}"))
    assert positions.shape == (2, expected_count)
    for row, start in zip(positions.tolist(), (3, 10)):
        front = expected_count // 2
        assert row == list(range(start, start + front)) + list(range(start + 16 - (expected_count - front), start + 16))
    # 1.23 % of SigLIP's 729 tokens is the paper's f4+l5
    big = torch.zeros(1, 800, dtype=torch.bool)
    big[0, 40:769] = True
    assert torch.equal(select_positions(big, None, parse_positions("ratio=0.0123")),
                       select_positions(big, None, parse_positions("f4+l5")))


def test_text_modality_positions():
    image_mask = torch.zeros(2, 12, dtype=torch.bool)
    image_mask[0, 2:6] = True
    attention = torch.ones(2, 12, dtype=torch.long)
    attention[0, 10:] = 0
    positions = select_positions(image_mask, attention, parse_positions("f2+l2"), modality="text")
    assert positions[0].tolist() == [0, 1, 8, 9]  # attended non-image tokens only
    assert positions[1].tolist() == [0, 1, 10, 11]  # a text-only sample is steered on its text


def test_option_parsing_and_errors():
    assert parse_layers("all", 6) == [0, 1, 2, 3, 4, 5]
    assert parse_layers("every_2nd", 6) == [0, 2, 4]
    assert parse_layers("0-2,5", 6) == [0, 1, 2, 5]
    assert parse_layers([0, -1], 6) == [0, 5]
    for bad in ("0-9", "every_0", "x", [7]):
        with pytest.raises(FactoryError):
            parse_layers(bad, 6)
    assert parse_positions("all").ratio == 1.0
    for bad in ("g4", "ratio=2", "ratio=abc", "f0+l0", ""):
        with pytest.raises(FactoryError):
            parse_positions(bad)
    model = tiny_model()
    for bad in ({"rnak": 2}, {"rank": 0}, {"modality": "audio"}, {"layers": "5-6"}):
        with pytest.raises(FactoryError):
            apply_tuning(tiny_model(), {**MORES, **bad})
    apply_tuning(model, {**MORES, "layers": [1]})
    assert list(model.llm.mores.interventions) == ["1"]


def test_sizes_read_from_the_model():
    model = tiny_model(hidden=32, layers=3)
    report = apply_tuning(model, {**MORES, "rank": 2})
    assert len(model.llm.mores.interventions) == 3
    assert report["trainable_llm"] == 3 * 2 * (2 * 32 + 1)


def _layer_outputs(model, ids, mask, pixels):
    captured = []
    handles = [layer.register_forward_hook(lambda m, a, out: captured.append(
        (out[0] if isinstance(out, tuple) else out).detach().clone())) for layer in model.llm.model.layers]
    with torch.no_grad():
        model(ids, mask, pixels)
    for handle in handles:
        handle.remove()
    return captured


def test_only_selected_positions_change():
    model = tiny_model(llm="llama").eval()
    ids, mask, pixels, _ = make_batch(model, offsets=(2, 9, 0), pad_left=(False, True, False),
                                      with_image=(True, True, False))
    baseline = _layer_outputs(model, ids, mask, pixels)
    apply_tuning(model, MORES)
    model.eval()
    steered = _layer_outputs(model, ids, mask, pixels)  # capture hooks run after the MoReS hooks
    positions = model.llm.mores.positions
    selected = torch.zeros(ids.shape, dtype=torch.bool)
    for b in range(ids.shape[0]):
        selected[b, positions[b][positions[b] >= 0]] = True
    assert selected.sum() == 18 and not selected[2].any()
    changed = (steered[0] - baseline[0]).abs().amax(-1) > 0
    assert torch.equal(changed, selected)  # layer 0: exactly the chosen positions
    assert torch.equal(steered[1][2], baseline[1][2])  # the image-free sample is never touched


def test_gradients_reach_only_mores_and_connector():
    model = tiny_model()
    apply_tuning(model, MORES)
    ids, mask, pixels, labels = make_batch(model)
    model(ids, mask, pixels, labels=labels).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("connector.", "llm.mores.")) for n in with_grad)
    mores = {n: p for n, p in model.named_parameters() if n.startswith("llm.mores.")}
    assert len(mores) == 2 * 3  # per layer: R's reflectors, W, b
    assert all(float(p.grad.abs().sum()) > 0 for p in mores.values())


def test_decode_steps_are_not_steered_and_generation_runs():
    model = tiny_model().eval()
    apply_tuning(model, MORES)
    mores: MoReS = model.llm.mores
    mores.observe_batch(torch.zeros(2, 1, dtype=torch.bool), torch.ones(2, 1))
    hidden = torch.randn(2, 1, 64)
    assert torch.equal(mores.steer("0", hidden), hidden)
    ids, mask, pixels, _ = make_batch(model, length=30, pad_left=(True, True))
    out = model.generate(ids, mask, pixels, max_new_tokens=4, eos_token_id=-1)
    assert [len(x) for x in out] == [4, 4]
    mores.observe_batch(torch.ones(2, 5, dtype=torch.bool), None)
    with pytest.raises(FactoryError):  # stale positions for another shape must not be applied silently
        mores.steer("0", torch.randn(2, 7, 64))


@pytest.mark.parametrize("hidden,rank", [(64, 1), (64, 4), (300, 2)])
def test_householder_columns_equal_torch_orthogonal_map(hidden, rank):
    """Our O(D·d²) householder product must be torch's householder orthogonal map, for arbitrary stored values."""
    from factory.tuners.mores import MoReSIntervention, householder_columns

    torch.manual_seed(hidden + rank)
    module = MoReSIntervention(hidden, rank, dropout=0.0)
    param = module.rotate.parametrizations.weight
    stored = torch.randn(hidden, rank)
    stored.diagonal().copy_(torch.tensor([1.0, -1.0] * rank)[:rank])
    expected = param[0](stored)
    ours = householder_columns(stored)
    assert torch.allclose(ours, expected, atol=1e-6)
    assert torch.allclose(ours.t() @ ours, torch.eye(rank), atol=1e-5)
