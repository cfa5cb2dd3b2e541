"""The two MoReS ablations of the micro-world comparison: R frozen at its initial value (tuner.train_rotation=false)
and MoReS on text tokens (modality=text), which must steer the same tokens in training and in generation."""
import torch

from factory.constants import IGNORE_INDEX
from factory.testing import tiny_model
from factory.tuners import apply_tuning
from factory.tuners.mores_positions import parse_positions, prompt_text_tokens, select_positions
from test_mores import MORES, make_batch


def test_frozen_rotation_counts_trains_and_reloads_without_r():
    torch.manual_seed(0)
    model = tiny_model(hidden=32, layers=3)
    report = apply_tuning(model, {**MORES, "rank": 2, "train_rotation": False})
    assert report["trainable_llm"] == 3 * 2 * (32 + 1)  # W and b only: d(D+1) per layer
    mores = model.llm.mores
    before = {k: iv.rotation().detach().clone() for k, iv in mores.interventions.items()}
    ids, mask, pixels, labels = make_batch(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    w0 = mores.interventions["0"].project.weight.detach().clone()
    model(ids, mask, pixels, labels=labels).loss.backward()
    opt.step()
    assert all(torch.equal(iv.rotation(), before[k]) for k, iv in mores.interventions.items())
    assert not torch.equal(mores.interventions["0"].project.weight, w0)
    state = model.trainable_state_dict()
    assert not any(".rotate." in name for name in state)  # R is not a trainable weight: it is not saved

    torch.manual_seed(123)  # another global RNG state: the frozen R is seeded per layer, not drawn from it
    again = tiny_model(hidden=32, layers=3)
    again.load_state_dict(model.state_dict(), strict=False)  # the same base (a checkpoint rebuilds it from files)
    apply_tuning(again, {**MORES, "rank": 2, "train_rotation": False})
    again.load_trainable_state_dict(state)
    model.eval()
    again.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, mask, pixels).logits, again(ids, mask, pixels).logits)
    # the layers' frozen rotations differ from each other (one seed per layer)
    assert not torch.equal(before["0"], before["1"])


def test_trained_rotation_moves():
    torch.manual_seed(0)
    model = tiny_model(hidden=32, layers=2)
    apply_tuning(model, {**MORES, "rank": 2})
    r0 = model.llm.mores.interventions["0"].rotation().detach().clone()
    ids, mask, pixels, labels = make_batch(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(ids, mask, pixels, labels=labels).loss.backward()
    opt.step()
    assert not torch.allclose(model.llm.mores.interventions["0"].rotation(), r0)


def test_text_positions_skip_answers_and_decode_steps():
    image_mask = torch.zeros(1, 10, dtype=torch.bool)
    image_mask[0, 1:3] = True
    attention = torch.ones(1, 10, dtype=torch.long)
    labels = torch.full((1, 10), IGNORE_INDEX)
    labels[0, 7:] = 5  # the last three tokens are the trained answer
    spec = parse_positions("f2+l2")
    assert select_positions(image_mask, attention, spec, "text", labels)[0].tolist() == [0, 3, 5, 6]
    assert select_positions(image_mask, attention, spec, "text")[0].tolist() == [0, 3, 8, 9]  # no labels: prefill
    # a decode step: one new token, the mask covers the cache too → nothing is steered
    assert not prompt_text_tokens(torch.zeros(1, 1, dtype=torch.bool), torch.ones(1, 11)).any()


def test_text_modality_generation_steers_what_training_steers():
    """Cached greedy generation = a full forward per step whose labels mark the generated tokens as the answer (how
    training sees a sample): with modality=text both steer the last prompt tokens and never the answer."""
    torch.manual_seed(0)
    model = tiny_model(llm="llama")
    apply_tuning(model, {**MORES, "modality": "text", "positions": "f2+l3"})
    with torch.no_grad():  # make the steering large enough to matter
        for iv in model.llm.mores.interventions.values():
            iv.project.weight.normal_(0, 2.0)
    model.eval()
    ids, mask, pixels, _ = make_batch(model, length=30, pad_left=(True, True))
    got = model.generate(ids, mask, pixels, max_new_tokens=5, eos_token_id=-1)
    for b in range(ids.shape[0]):
        row_ids, row_mask = ids[b:b + 1], mask[b:b + 1]
        row_pixels = pixels[b:b + 1]
        tokens = []
        for _ in range(5):
            full = torch.cat([row_ids, torch.tensor([tokens], dtype=torch.long).view(1, -1)], 1)
            full_mask = torch.cat([row_mask, torch.ones(1, len(tokens), dtype=torch.long)], 1)
            labels = torch.full_like(full, IGNORE_INDEX)
            labels[0, row_ids.shape[1]:] = full[0, row_ids.shape[1]:]
            with torch.no_grad():
                logits = model(full, full_mask, row_pixels, labels=labels).logits
            tokens.append(int(logits[0, -1].argmax()))
        assert got[b] == tokens
    unsteered = tiny_model(llm="llama")
    unsteered.load_state_dict({k: v for k, v in model.state_dict().items() if ".mores." not in k}, strict=False)
    with torch.no_grad():  # and the steering is there: the prompt's last logits move
        moved = (model(ids, mask, pixels).logits[:, -1] - unsteered.eval()(ids, mask, pixels).logits[:, -1]).abs()
    assert float(moved.max()) > 1e-3
