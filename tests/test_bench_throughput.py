"""scripts/bench_throughput.py: the FLOP formula behind its MFU column, and a tiny-size CPU smoke run of the whole
script (our model per tuner + the HF Llava / PEFT baseline) in one or two optimizer steps."""
from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from dist_helpers import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_throughput", REPO / "scripts" / "bench_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_necessary_flops_counts_each_part_by_whether_it_trains(bench):
    vision = torch.nn.Linear(10, 20).requires_grad_(False)     # 200 weights, frozen, nothing below it trains
    connector = torch.nn.Linear(20, 30)                          # 600 weights, trained
    frozen_llm, trained_llm = torch.nn.Linear(30, 30).requires_grad_(False), torch.nn.Linear(30, 30)
    llm = torch.nn.ModuleList([torch.nn.Embedding(50, 30), frozen_llm, trained_llm])  # embeddings are lookups
    vision_cfg = SimpleNamespace(num_hidden_layers=2, hidden_size=20)
    text_cfg = SimpleNamespace(num_hidden_layers=3, hidden_size=30)
    batch, seq, n_image = 2, 10, 4
    tokens, image_tokens = batch * seq, batch * n_image
    expected = (2 * 200 * image_tokens                      # vision forward only
                + 4 * 2 * image_tokens * n_image * 20       # vision attention, forward only
                + 6 * 600 * image_tokens                    # connector trains
                + 6 * 900 * tokens + 4 * 900 * tokens       # trained / frozen LLM weights
                + 12 * 3 * tokens * seq * 30)               # LLM attention, forward + backward
    got = bench.necessary_flops(vision, connector, llm, vision_cfg, text_cfg, batch, seq, n_image)
    assert got == expected == 433120


def test_flop_count_leaves_out_mores_and_reads_no_bf16_rotation(bench):
    """MoReS's R and W are nn.Linear modules acting on 9 positions: not part of N. Its R is a parametrized weight
    that would need a QR (no bf16 kernel on CPU or CUDA) if read: the count of a bf16 MoReS model must not read it."""
    from factory.testing import tiny_model
    from factory.tuners import apply_tuning

    model = tiny_model(llm="phi")
    linear_weights = sum(bench._matmul_weights(model.llm))
    apply_tuning(model, {"name": "mores"})
    model = model.to(torch.bfloat16)
    # stage-2 MoReS: the LLM's own linear layers are frozen, and MoReS's trained ones are not counted
    assert bench._matmul_weights(model.llm) == (0, linear_weights) and linear_weights > 0


def test_mfu_reproduces_the_measured_hf_baseline(bench):
    """DESIGN's H100 number for HF Llava at llava_3b size, frozen LLM, batch 8 × seq 800: 31.96 samples/s ≈ 0.30
    MFU. Our formula on the same architecture (built on the meta device: no memory) must give that MFU."""
    from omegaconf import OmegaConf

    from factory.model.build import build_model
    from factory.tuners import apply_tuning

    cfg = bench.compose_config("llava_3b", "frozen", "real", [])
    model = build_model(OmegaConf.merge(cfg, {"init": "meta"}))
    apply_tuning(model, cfg.tuner, cfg.stage.instruct.tune)
    flops = bench.necessary_flops(model.vision, model.connector, model.llm, bench._hf_config_of(model.vision),
                                  model.llm.config, 8, 800, model.image_token_count)
    mfu = flops * 31.96 / 8 / 989e12
    assert 0.29 < mfu < 0.33, mfu


def test_bench_runs_at_tiny_size_on_cpu(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = bench.main(["--size", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--batch", "2",
                       "--tuners", "frozen,mores,lora,full", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    rows = {(r["side"], r["tuner"]): r for r in report["rows"]}
    assert set(rows) == {("ours", t) for t in ("frozen", "mores", "lora", "full")} | \
        {("hf", t) for t in ("frozen", "lora", "full")}
    for row in rows.values():
        assert row["samples_per_s"] > 0 and row["tokens_per_s"] == pytest.approx(row["samples_per_s"] * report["args"]["seq"])
        assert row["mfu"] is None  # fp32 on CPU: no meaningful peak
        assert row["tflops_per_step"] > 0
    # the baseline trains the same things: connector only / same LoRA adapters / the whole LLM (Phi's lm_head
    # bias is the one difference: HF Llava builds its own bias-free lm_head)
    assert rows["ours", "frozen"]["trainable_params"] == rows["hf", "frozen"]["trainable_params"]
    assert rows["ours", "lora"]["trainable_params"] == rows["hf", "lora"]["trainable_params"]
    assert 0 <= rows["ours", "full"]["trainable_params"] - rows["hf", "full"]["trainable_params"] <= 512
    assert rows["ours", "frozen"]["trainable_params"] < rows["ours", "mores"]["trainable_params"] \
        < rows["ours", "lora"]["trainable_params"]
    table = capsys.readouterr().out
    assert "| factory mores |" in table and "× HF lora" in table and "MoReS overhead" in table
