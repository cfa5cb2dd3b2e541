"""LMAR and visual share on constructed attention patterns (checked against a direct hand computation), the eager
switch being restored, the end-to-end analysis on a tiny model, and the overlay plot."""
import json

import pytest
import torch

from factory.constants import IMAGE_TOKEN_INDEX as IMG
from factory.errors import FactoryError
from factory.eval import imbalance


def _sequence():
    # [BOS, t, t, IMG, IMG, IMG, t | a, a]  prompt length 7 (BOS + 3 text + 3 image), answer 2 tokens
    return torch.tensor([1, 10, 11, IMG, IMG, IMG, 12, 20, 21])


def test_key_masks_define_text_as_prompt_without_bos_and_images():
    ids = _sequence()
    queries, image_keys, text_keys = imbalance.key_masks(ids, prompt_length=7, num_bos=1)
    assert queries.tolist() == [7, 8]
    assert image_keys[0].nonzero().flatten().tolist() == [3, 4, 5]
    assert text_keys[0].nonzero().flatten().tolist() == [1, 2, 6]
    _, _, with_bos = imbalance.key_masks(ids, 7, 1, "prompt_with_bos")
    assert with_bos[0].nonzero().flatten().tolist() == [0, 1, 2, 6]
    _, _, with_answer = imbalance.key_masks(ids, 7, 1, "prompt_and_answer")
    assert with_answer[0].nonzero().flatten().tolist() == [1, 2, 6, 7]      # causal: the first answer token
    assert with_answer[1].nonzero().flatten().tolist() == [1, 2, 6, 7, 8]
    with pytest.raises(FactoryError, match="text_tokens"):
        imbalance.key_masks(ids, 7, 1, "question")


def _constructed_attention(heads=2, length=9):
    """Rows of answer queries put chosen weights on BOS / text / image keys; the two heads differ."""
    attn = torch.zeros(heads, length, length)
    attn[:, :, 0] = 1.0  # rows that are not queries: all on BOS (ignored)
    # head 0, query 7: BOS .1, text (1,2,6) .1 each, image (3,4,5) .2 each, self .0
    attn[0, 7] = torch.tensor([.1, .1, .1, .2, .2, .2, .1, .0, 0])
    # head 1, query 7: image .1 each, text .2 each, BOS .1
    attn[1, 7] = torch.tensor([.1, .2, .2, .1, .1, .1, .2, .0, 0])
    # head 0 and 1, query 8: image all .3/3, text .4/3, BOS .2, answer .1
    attn[:, 8] = torch.tensor([.2, .4 / 3, .4 / 3, .1, .1, .1, .4 / 3, .05, .05])
    return attn


def test_layer_statistics_match_direct_computation():
    ids = _sequence()
    queries, image_keys, text_keys = imbalance.key_masks(ids, 7, 1)
    layer_a = _constructed_attention()
    layer_b = layer_a.clone()
    layer_b[:, 7] = torch.tensor([.0, .0, .0, 1 / 3, 1 / 3, 1 / 3, .0, .0, 0])  # all image: α_text = 0 → ratio inf
    stats = imbalance.layer_statistics([layer_a[None], layer_b], queries, image_keys, text_keys)
    # direct: heads averaged first. query 7: image per token (.2+.1)/2 = .15; text per token (.1+.2)/2 = .15
    #         query 8: image per token .1; text per token .4/3
    alpha_image = (0.15 + 0.1) / 2
    alpha_text = (0.15 + 0.4 / 3) / 2
    assert stats["alpha_image"][0] == pytest.approx(alpha_image)
    assert stats["alpha_text"][0] == pytest.approx(alpha_text)
    assert stats["ratio"][0] == pytest.approx(alpha_image / alpha_text)
    assert stats["visual_share"][0] == pytest.approx((0.45 + 0.3) / 2)   # image mass per query, averaged
    assert stats["text_share"][0] == pytest.approx((0.45 + 0.4) / 2)
    assert stats["visual_share"][1] == pytest.approx((1.0 + 0.3) / 2)
    assert stats["text_share"][1] == pytest.approx((0.0 + 0.4) / 2)


def test_lmar_is_a_mean_of_ratios_not_a_ratio_of_means():
    s1 = {"alpha_image": [0.1], "alpha_text": [0.1], "ratio": [1.0], "visual_share": [0.5], "text_share": [0.5]}
    s2 = {"alpha_image": [0.3], "alpha_text": [0.1], "ratio": [3.0], "visual_share": [0.7], "text_share": [0.3]}
    s3 = {"alpha_image": [0.1], "alpha_text": [0.5], "ratio": [0.2], "visual_share": [0.1], "text_share": [0.9]}
    agg = imbalance.aggregate([s1, s2, s3])
    assert agg["lmar"] == pytest.approx([(1.0 + 3.0 + 0.2) / 3])          # 1.4
    assert agg["lmar"][0] != pytest.approx(agg["alpha_image"][0] / agg["alpha_text"][0])  # ratio of means ≈ 0.71
    assert agg["lmar_median"] == pytest.approx([1.0])
    assert agg["visual_share"] == pytest.approx([1.3 / 3])
    with pytest.raises(FactoryError, match="no usable sample"):
        imbalance.aggregate([])


def test_analysis_on_tiny_model_restores_attention_and_plots(tmp_path):
    from PIL import Image

    from factory.eval.plots import plot_imbalance
    from factory.testing import tiny_model

    model = tiny_model(layers=2)
    before = model.llm.config._attn_implementation
    questions = []
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 20, 200)).save(tmp_path / f"{i}.png")
        questions.append({"question_id": i, "text": "What color is the shape?", "image": f"{i}.png"})
    questions.append({"question_id": 9, "text": "text only", "image": None})   # never analysed
    result = imbalance.analyze(model, questions, tmp_path, num_samples=3, max_new_tokens=3, batch_size=2,
                               progress=False, label="tiny")
    assert model.llm.config._attn_implementation == before
    assert result["n_samples"] + result["skipped_empty_answer"] == 3 and result["n_samples"] > 0
    assert result["num_layers"] == 2 and len(result["lmar"]) == 2 and len(result["visual_share"]) == 2
    for lmar, share, text in zip(result["lmar"], result["visual_share"], result["text_share"]):
        assert lmar > 0 and 0 < share < 1 and 0 < share + text <= 1 + 1e-6
    # the per-sample path equals the direct computation on the model's own eager attention tensors
    path = imbalance.write_results(result, tmp_path / "a.json")
    other = dict(result, label="other", lmar=[v * 2 for v in result["lmar"]])
    png = plot_imbalance([path, other], tmp_path / "fig.png")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert json.loads(path.read_text())["label"] == "tiny"


def test_analyze_sample_equals_direct_attention_computation():
    from factory.testing import tiny_model

    model = tiny_model(layers=2).eval()
    n = model.image_token_count
    prompt = [5, 6] + [IMG] * n + [7, 8]
    answer = [9, 10, 11]
    pixels = torch.randn(1, 3, 32, 32)
    stats = imbalance.analyze_sample(model, prompt, answer, pixels)
    ids = torch.tensor(prompt + answer)
    with imbalance.eager_attention(model), torch.no_grad():
        attn = model(ids[None], torch.ones(1, len(ids), dtype=torch.long), pixels, output_attentions=True).attentions
    for layer, a in enumerate(attn):
        rows = a[0].mean(0)[len(prompt):]                       # answer queries, heads averaged
        img_cols = [i for i, t in enumerate(prompt) if t == IMG]
        txt_cols = [i for i, t in enumerate(prompt) if t != IMG]   # no BOS in the tiny phi tokenizer
        direct = (rows[:, img_cols].mean(1).mean() / rows[:, txt_cols].mean(1).mean()).item()
        assert stats["ratio"][layer] == pytest.approx(direct, rel=1e-5)
        assert stats["visual_share"][layer] == pytest.approx(rows[:, img_cols].sum(1).mean().item(), rel=1e-5)
    assert imbalance.analyze_sample(model, prompt, [], pixels) is None
