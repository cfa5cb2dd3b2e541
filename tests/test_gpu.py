"""The bf16 CUDA path (`pytest -m gpu`, run by scripts/gpu_check.sh; skipped without CUDA).

* bf16 MoReS training through the DeepSpeed engine on the GPU keeps R orthonormal, also under CUDA autocast;
* cached greedy generation in bf16 matches uncached (teacher-forced) decoding;
* a real `python train.py` process, DeepSpeed ZeRO-2 on one GPU, tiny model, bf16;
* our LlavaModel and transformers' LlavaForConditionalGeneration with the same weights give the same logits in bf16
  within tolerance. The same comparison in fp32 on CPU (tight tolerance) runs everywhere and checks the weight
  mapping, so that the GPU test can only fail on precision.
"""
import json
import sys

import pytest
import torch

from factory.constants import IMAGE_TOKEN_INDEX
from factory.testing import tiny_model

HAS_CUDA = torch.cuda.is_available()
# Ours and HF's Llava run the same ops in the same order: measured max |Δlogit| = 0.0 on CPU in fp32 and in bf16
# (torch 2.14, transformers 5.24). On CUDA kernels may pick other reduction orders per shape; logits of the tiny
# random models are O(1), so a few bf16 ulps at that scale are allowed there.
BF16_LOGIT_ATOL = 0.08
# cached vs uncached decoding in bf16: the same model, different shapes (one token vs the whole sequence), so other
# rounding; max |Δlogit| / max |logit| measured on CPU (torch 2.14): 0.0075–0.0092, about one bf16 ulp (2⁻⁷) of
# the largest logit; three ulps are allowed.
BF16_RELATIVE_GAP = 0.025
FP32_LOGIT_ATOL = 1e-5


# ------------------------------------------------------------------------------------------------- HF twin
def hf_twin(model, dtype: torch.dtype, device: str):
    """transformers' LlavaForConditionalGeneration holding exactly our model's weights (vision tower, projector,
    LLM body and head), and the id it uses for image tokens. Phi's lm_head bias is set to zero in `model` (HF's
    Llava head has none)."""
    from train_support import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    from bench_throughput import _hf_config_of, build_hf

    text_cfg = model.llm.config
    hf = build_hf(_hf_config_of(model.vision), text_cfg, model.image_token_count, "frozen", {}, torch.float32, "cpu")
    hf.model.vision_tower.load_state_dict(model.vision.model.state_dict())
    projector = hf.model.multi_modal_projector
    projector.linear_1.load_state_dict(model.connector[0].state_dict())
    projector.linear_2.load_state_dict(model.connector[2].state_dict())
    hf.model.language_model.load_state_dict(model.llm.model.state_dict())
    head = model.llm.lm_head
    if head.bias is not None:
        # LlavaForConditionalGeneration's lm_head is bias-free, Phi's is not: compare with a zero bias on our side
        with torch.no_grad():
            head.bias.zero_()
    hf.lm_head.weight.data.copy_(head.weight.data)
    return hf.to(device=device, dtype=dtype).eval(), text_cfg.vocab_size - 1


def image_batch(model, batch: int = 2, length: int = 40, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n = model.image_token_count
    ids = torch.randint(5, 500, (batch, length), generator=gen)
    ids[:, 3:3 + n] = IMAGE_TOKEN_INDEX
    size = model.vision.image_size
    return ids, torch.ones_like(ids), torch.randn(batch, 3, size, size, generator=gen)


def compare_with_hf(llm: str, vision: str, dtype: torch.dtype, device: str) -> float:
    model = tiny_model(llm=llm, vision=vision, hidden=128, layers=2, seed=3)
    hf, image_id = hf_twin(model, dtype, device)
    model = model.to(device=device, dtype=dtype).eval()
    ids, mask, pixels = (t.to(device) for t in image_batch(model))
    with torch.no_grad():
        ours = model(ids, mask, pixels.to(dtype)).logits.float()
        theirs = hf(input_ids=ids.masked_fill(ids == IMAGE_TOKEN_INDEX, image_id), attention_mask=mask,
                    pixel_values=pixels.to(dtype)).logits.float()
    assert ours.shape == theirs.shape
    assert float(ours.abs().max()) > 0.1  # not a trivially tiny output
    return float((ours - theirs).abs().max())


@pytest.mark.parametrize("llm,vision", [("phi", "hf_siglip"), ("llama", "hf_clip")])
def test_hf_equivalence_fp32_cpu(llm, vision):
    """The weight mapping of hf_twin is right: fp32 logits agree to float rounding (llava_3b and 7b/13b families)."""
    assert compare_with_hf(llm, vision, torch.float32, "cpu") < FP32_LOGIT_ATOL


@pytest.mark.parametrize("llm,vision", [("phi", "hf_siglip"), ("llama", "hf_clip")])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (run by scripts/gpu_check.sh)")
def test_hf_equivalence_bf16_cuda(llm, vision):
    gap = compare_with_hf(llm, vision, torch.bfloat16, "cuda")
    print(f"{llm}+{vision} bf16 cuda: max |ours - HF| logit = {gap:.4f}")
    assert gap < BF16_LOGIT_ATOL


# ------------------------------------------------------------------------------------------------- MoReS training
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (run by scripts/gpu_check.sh)")
def test_bf16_mores_training_on_cuda_keeps_r_orthonormal(tmp_path):
    from test_bf16 import TUNERS, orthonormality_error, train_bf16
    from train_support import make_small_world

    world = make_small_world(tmp_path / "world")
    samples = json.loads((world / "instruct.json").read_text())[:8]
    (world / "instruct8.json").write_text(json.dumps(samples))
    model, result, _, before = train_bf16("mores", world, tmp_path / "run")
    assert next(model.llm.parameters()).device.type == "cuda"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad)
    losses = result.losses
    assert (losses[0] + losses[1]) / 2 - (losses[-1] + losses[-2]) / 2 > TUNERS["mores"][1], losses
    after = {f"layer{k}.R": m.rotation().detach().clone() for k, m in model.llm.mores.interventions.items()}
    moved = max(float((after[k].cpu() - before[k].cpu()).abs().max()) for k in after if k.endswith(".R"))
    assert moved > 1e-3
    with torch.autocast("cuda", dtype=torch.bfloat16):
        rotations = [m.rotation() for m in model.llm.mores.interventions.values()]
    for rot in rotations:
        assert rot.dtype == torch.float32 and orthonormality_error(rot.cpu()) < 1e-5


# ------------------------------------------------------------------------------------------------- generation
def cached_matches_uncached(device: str) -> float:
    """bf16 decoding with the KV cache (MoReS steering the prefill only) vs one uncached forward over the prompt plus
    the generated tokens: the logits of every generated position agree to bf16 rounding, and the greedy tokens are
    the uncached argmax wherever its top-2 margin is clear. Returns the largest logit gap relative to the logit scale."""
    from factory.tuners import apply_tuning

    model = tiny_model(llm="llama", vision="hf_clip", hidden=128, layers=4, seed=1)
    apply_tuning(model, {"name": "mores", "rank": 1, "layers": "all", "positions": "f4+l5", "dropout": 0.0})
    with torch.no_grad():
        for module in model.llm.mores.interventions.values():
            module.project.weight.mul_(20.0)  # a strong steering, so that the cache must carry it
        model.llm.lm_head.weight.mul_(30.0)  # O(1) logits with clear winners (a random head is nearly flat)
    model = model.to(device=device, dtype=torch.bfloat16).eval()
    ids, mask, pixels = (t.to(device) for t in image_batch(model, batch=2, length=30))
    pixels = pixels.to(torch.bfloat16)
    new = 12
    generated = model.generate(ids, mask, pixels, max_new_tokens=new, eos_token_id=[])
    assert [len(g) for g in generated] == [new, new]
    tokens = torch.tensor(generated, device=device)
    with torch.no_grad():
        # the cached path step by step (what generate does), keeping every step's logits
        out = model(ids, mask, pixels, use_cache=True)
        cached, attention = [out.logits[:, -1]], mask
        for k in range(new - 1):
            attention = torch.cat([attention, attention.new_ones(2, 1)], dim=1)
            out = model(tokens[:, k:k + 1], attention, cache=out.cache, use_cache=True)
            cached.append(out.logits[:, -1])
        cached = torch.stack(cached, dim=1).float()
        full = torch.cat([ids, tokens], dim=1)
        uncached = model(full, torch.ones_like(full), pixels).logits[:, ids.shape[1] - 1:-1].float()
    assert torch.equal(cached.argmax(-1), tokens)  # generate is the cached greedy path
    scale = float(uncached.abs().max())
    gap_abs = float((cached - uncached).abs().max())
    gap = gap_abs / scale
    assert scale > 1.0 and gap < BF16_RELATIVE_GAP, gap
    # where the top-2 margin exceeds twice the largest logit gap, rounding cannot flip the argmax: tokens must agree
    top2 = uncached.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * gap_abs
    assert int(clear.sum()) >= new  # at least half of the 2 × 12 positions
    assert torch.equal(uncached.argmax(-1)[clear], tokens[clear])
    return gap


def test_bf16_cached_generation_matches_uncached_cpu():
    cached_matches_uncached("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (run by scripts/gpu_check.sh)")
def test_bf16_cached_generation_matches_uncached_cuda():
    cached_matches_uncached("cuda")


# ------------------------------------------------------------------------------------------------- train.py
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (run by scripts/gpu_check.sh)")
def test_train_py_zero2_one_gpu_bf16(tmp_path):
    from dist_helpers import child_env, launch_command, run_checked, tiny_overrides
    from factory import checkpoint as ckpt

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, tmp_path / "data", tuner="mores", zero=2, max_steps=4)
    out = run_checked(launch_command("python", overrides + ["trainer.precision=auto"]),
                      child_env(CUDA_VISIBLE_DEVICES="0"), timeout=300)
    summary = json.loads(out.strip().splitlines()[-1])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["pretrain"] * 4 + ["instruct"] * 4
    assert all(r["loss"] == r["loss"] and r["samples_per_s"] > 0 for r in records)
    assert summary["instruct_final_loss"] == pytest.approx(records[-1]["loss"])
    weights = ckpt.load_weights_file(run_dir / "instruct")
    assert weights and all(t.dtype == torch.bfloat16 for t in weights.values())  # precision=auto is bf16 on CUDA
    model = ckpt.load_checkpoint(run_dir / "instruct", device="cuda", dtype=torch.bfloat16)
    ids, mask, pixels = (t.cuda() for t in image_batch(model, batch=1, length=model.image_token_count + 8))
    with torch.no_grad():
        logits = model(ids, mask, pixels.to(torch.bfloat16)).logits
    assert logits.is_cuda and bool(torch.isfinite(logits.float()).all())


# ------------------------------------------------------------------------------------------------- CPU checks of the GPU script
def test_synthetic_llava_generator(tmp_path):
    """scripts/make_synthetic_llava.py: LLaVA JSON the data pipeline reads, long enough answers, deterministic,
    and it never overwrites an earlier output silently."""
    import filecmp
    import subprocess

    from factory.data import LlavaJsonDataset, get_template
    from train_support import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    from make_synthetic_llava import generate, parse_args

    paths = generate(tmp_path / "a", pretrain=3, instruct=5, images=2, image_size=32, answer_words=40, turns=2, seed=1)
    generate(tmp_path / "b", pretrain=3, instruct=5, images=2, image_size=32, answer_words=40, turns=2, seed=1)
    instruct = json.loads(paths["instruct"].read_text())
    assert len(instruct) == 5 and len(json.loads(paths["pretrain"].read_text())) == 3
    assert len(instruct[0]["conversations"]) == 4 and instruct[0]["conversations"][0]["value"].startswith("<image>\n")
    assert sorted(p.name for p in paths["images"].iterdir()) == ["synth_0000.png", "synth_0001.png"]
    assert paths["instruct"].read_text() == (tmp_path / "b" / "instruct.json").read_text()
    assert filecmp.cmp(paths["images"] / "synth_0001.png", tmp_path / "b" / "images" / "synth_0001.png", shallow=False)

    model = tiny_model()
    dataset = LlavaJsonDataset(json_path=str(paths["instruct"]), image_folder=str(paths["images"]),
                               tokenizer=model.tokenizer, template=get_template("phi"),
                               image_transform=model.vision.image_transform, num_image_tokens=16, max_length=2048)
    item = dataset[0]
    assert len(item["input_ids"]) > 16 + 2 * 40  # image span + two answers of ≥ 40 tokens
    assert item["pixel_values"].shape == (3, 32, 32)

    script = [sys.executable, str(REPO / "scripts" / "make_synthetic_llava.py")]
    again = subprocess.run(script + [str(tmp_path / "a")], capture_output=True, text=True)
    assert again.returncode != 0 and "--force" in again.stderr  # existing output is not overwritten
    with pytest.raises(SystemExit):
        parse_args([str(tmp_path / "c"), "--images", "0"])


def test_gpu_check_script_on_cpu_at_tiny_size(tmp_path):
    """scripts/gpu_check.sh parses, rejects bad arguments, and its env, train and bench13b sections run as written (tiny
    model, CPU): synthetic data → 1 stage-1 step + 3 stage-2 steps in bf16 → samples/s in train_3b.json; the 13B
    memory bench → its "fits in 80 GB" line; summary.md."""
    import os
    import subprocess

    from dist_helpers import child_env
    from train_support import REPO

    script = str(REPO / "scripts" / "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    env = child_env(PYTHON=sys.executable)
    env.pop("OUT", None)
    for bad in (["--bogus"], ["--only", "nope"]):
        result = subprocess.run(["bash", script, *bad], capture_output=True, text=True, env=env)
        assert result.returncode == 2 and "gpu_check.sh:" in result.stderr
    out = tmp_path / "results"
    result = subprocess.run(["bash", script, "--tiny", "--only", "env,train,bench13b", str(out)], capture_output=True,
                            text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    train = json.loads((out / "train_3b.json").read_text())
    assert train["instruct_steps"] == 3 and train["samples_per_s_mean"] > 0, train
    records = [json.loads(line) for line in (out / "train_3b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["pretrain"] + ["instruct"] * 3
    status = [line.split()[:2] for line in (out / "status.txt").read_text().splitlines()]
    assert status == [["train_3b", "ok"], ["bench_13b", "ok"], ["bench_13b_gc", "ok"]]
    assert json.loads((out / "env.json").read_text())["torch"] == torch.__version__
    summary = (out / "summary.md").read_text()
    assert "samples_per_s_mean" in summary and summary.count("fits in an 80 GB GPU") == 2
    again = subprocess.run(["bash", script, "--tiny", "--only", "train", str(out)], capture_output=True, text=True,
                           env=env)
    assert again.returncode == 2 and "already holds results" in again.stderr
    assert os.path.isdir(out / "train_3b")
