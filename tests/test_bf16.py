"""bf16 training through the DeepSpeed engine on CPU (the GPU's precision path, at tiny size).

Each tuner trains stage 2 (instruct) for 8 optimizer steps with `trainer.precision=bf16`, through the same pieces
as `train.py` (build_stage_model → build_dataset → train_stage on a DeepSpeed ZeRO-2 bf16 engine with fp32 master
weights), on 8 fixed samples so that the loss must fall. Then: the model's weights are bf16, MoReS's R is still
orthonormal (and also under torch.autocast), and the saved checkpoint reloads to the same logits.
"""
import json

import pytest
import torch

from factory.constants import IMAGE_TOKEN_INDEX
from factory import checkpoint as ckpt
from train_support import make_small_world, train_cfg

STEPS = 8
# Per tuner: peak lr and how much the mean loss of the last 2 steps must be below that of the first 2. Measured on
# this setup in bf16: frozen −0.082, mores −0.083 (the random 2-layer LLM leaves the connector and a rank-1 steering
# little to gain: the loss plateaus near 6.19), lora −0.69, full −0.91; the margins are half of that, far above the
# bf16 noise of the loss (< 0.005, see test_bf16_follows_the_fp32_trajectory).
# |bf16 loss − fp32 loss| per step for full tuning: measured ≤ 0.0041 over the 8 steps.
BF16_LOSS_GAP = 0.02
TUNERS = {"frozen": (1e-2, 0.04), "mores": (1e-2, 0.04), "lora": (1e-3, 0.35), "full": (1e-3, 0.45)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The small micro-world, plus an instruct file of 8 samples: one global batch, seen at every step."""
    root = make_small_world(tmp_path_factory.mktemp("world"))
    samples = json.loads((root / "instruct.json").read_text())[:8]
    (root / "instruct8.json").write_text(json.dumps(samples))
    return root


def train_bf16(tuner: str, world, run_dir, precision: str = "bf16"):
    """Stage 2 of `tuner` for STEPS steps; returns (model after training, StageResult, 4 collated samples,
    MoReS's R/W/b before training)."""
    from factory.distributed import init_distributed
    from factory.train.loop import StageContext, train_stage
    from factory.train.metrics import MetricsFile, WandbLogger
    from factory.train.recipe import build_dataset, build_stage_model
    from factory.stages import plan_stages

    lr = TUNERS[tuner][0]
    cfg = train_cfg(run_dir, world, tuner=tuner, stage="instruct", **{
        "trainer.precision": precision, "trainer.instruct.lr": lr, "trainer.instruct.epochs": STEPS,
        "trainer.instruct.global_batch_size": 8, "trainer.instruct.micro_batch_size": 8,
        "trainer.instruct.warmup_ratio": 0.0, "data.instruct.json": str(world / "instruct8.json")})
    dist = init_distributed()
    spec = plan_stages(cfg)[0]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = build_stage_model(cfg, spec, None, dtype)  # the connector starts random (no stage 1 here)
    dataset, collate = build_dataset(cfg, spec, model)
    ctx = StageContext(cfg=cfg, dist=dist, run_dir=run_dir, dtype=dtype,
                       metrics=MetricsFile(run_dir / "metrics.jsonl"),
                       wandb=WandbLogger({"name": "none"}, run_dir, {}, enabled=False))
    before = ({f"layer{k}.R": m.rotation().detach().clone() for k, m in model.llm.mores.interventions.items()}
              if tuner.startswith("mores") else None)
    result = train_stage(model, spec, dataset, collate, ctx)
    return model, result, collate([dataset[i] for i in range(4)]), before


@pytest.fixture(scope="module")
def bf16_runs(world, tmp_path_factory):
    """tuner → (tuner, model, result, batch, MoReS before), each trained once per module, on first use."""
    cache = {}

    def get(tuner: str):
        if tuner not in cache:
            cache[tuner] = (tuner, *train_bf16(tuner, world, tmp_path_factory.mktemp(f"bf16_{tuner}")))
        return cache[tuner]
    return get


@pytest.fixture(params=list(TUNERS))
def trained(request, bf16_runs):
    return bf16_runs(request.param)


def orthonormality_error(rot: torch.Tensor) -> float:
    """max |RᵀR − I|, computed in fp64 (outside any autocast region the caller may be in)."""
    rot = rot.detach().double()
    with torch.autocast("cpu", enabled=False):
        return float((rot.t() @ rot - torch.eye(rot.shape[1], dtype=rot.dtype)).abs().max())


def test_bf16_engine_trains_and_loss_falls(trained):
    tuner, model, result, _, _ = trained
    losses = result.losses
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    drop = (losses[0] + losses[1]) / 2 - (losses[-1] + losses[-2]) / 2
    assert drop > TUNERS[tuner][1], f"{tuner}: bf16 losses {losses}"
    # the engine ran in bf16: it cast the model's parameters (its fp32 master copies live in the optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.bfloat16 for p in trainable)
    assert model.llm.get_input_embeddings().weight.dtype == torch.bfloat16


def test_bf16_mores_rotation_stays_orthonormal_and_moves(bf16_runs):
    _, model, _, _, before = bf16_runs("mores")
    after = {f"layer{k}.R": m.rotation().detach().clone() for k, m in model.llm.mores.interventions.items()}
    moved = 0.0
    for key, value in after.items():
        if key.endswith(".R"):
            assert value.dtype == torch.float32
            assert orthonormality_error(value) < 1e-5, key
            moved = max(moved, float((value - before[key]).abs().max()))
    assert moved > 1e-3  # R trained (through its bf16-stored reflectors): orthonormality is not trivially kept
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rotations = {key: module.rotation() for key, module in model.llm.mores.interventions.items()}
    for key, rot in rotations.items():
        assert rot.dtype == torch.float32 and orthonormality_error(rot) < 1e-5
        assert torch.equal(rot, after[f"layer{key}.R"])  # autocast changes nothing


def test_bf16_checkpoint_reload_reproduces_logits(trained):
    tuner, model, result, batch, _ = trained
    loaded = ckpt.load_checkpoint(result.checkpoint, dtype=torch.bfloat16)
    saved = ckpt.load_weights_file(result.checkpoint)
    assert saved and all(t.dtype == torch.bfloat16 for t in saved.values())
    model.eval()
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"].to(torch.bfloat16))
    assert bool((batch["input_ids"] == IMAGE_TOKEN_INDEX).any())
    with torch.no_grad():
        expected = model(**inputs).logits
        got = loaded(**inputs).logits
    assert expected.dtype == got.dtype == torch.bfloat16
    assert torch.equal(expected, got), float((expected.float() - got.float()).abs().max())


def test_mores_intervention_is_immune_to_autocast():
    """Autocast must not reach the fp32 steering: same R, same output, bit for bit; gradients stay fp32."""
    from factory.tuners.mores import MoReSIntervention

    torch.manual_seed(0)
    module = MoReSIntervention(hidden=256, rank=4)
    hidden = torch.randn(9, 256, dtype=torch.bfloat16)
    reference, rot = module(hidden), module.rotation()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        steered, rot_autocast = module(hidden), module.rotation()
        steered.float().square().sum().backward()
    assert rot_autocast.dtype == torch.float32 and orthonormality_error(rot_autocast) < 1e-5
    assert torch.equal(rot, rot_autocast) and torch.equal(reference, steered)
    stored = module.rotate.parametrizations.weight.original
    assert stored.grad is not None and stored.grad.dtype == torch.float32
    # one optimizer step taken under autocast still yields an orthonormal R
    with torch.no_grad():
        stored -= 0.5 * stored.grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rot_after = module.rotation()
    assert float((rot_after - rot).abs().max()) > 1e-3 and orthonormality_error(rot_after) < 1e-5


def test_bf16_follows_the_fp32_trajectory(bf16_runs, world, tmp_path):
    """The bf16 engine keeps fp32 master weights: its loss curve stays on the fp32 run's, step by step (measured
    on full tuning, where every LLM weight is updated through the masters)."""
    _, _, result, _, _ = bf16_runs("full")
    _, fp32, _, _ = train_bf16("full", world, tmp_path, precision="fp32")
    gaps = [abs(a - b) for a, b in zip(result.losses, fp32.losses)]
    print("bf16 - fp32 loss gaps:", [round(g, 4) for g in gaps])
    assert max(gaps) < BF16_LOSS_GAP and fp32.losses[-1] < fp32.losses[0] - 0.45


# ------------------------------------------------------------------------------------------------- real-size smoke
def test_smoke_real_size_script_at_tiny_size_and_on_meta(tmp_path):
    """scripts/smoke_real_size.py's own code: the bf16 stage-2 run + cached generation at tiny size, and the llava_7b
    setup on meta (576 CLIP tokens, f4+l5 positions, the paper's TP*, parameter groups, connector shape)."""
    import sys

    from train_support import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    import smoke_real_size

    assert smoke_real_size.main(["--model", "tiny", "--meta", "llava_7b", "--seq", "60", "--steps", "2",
                                 "--new-tokens", "3", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "smoke_real_size.json").read_text())
    real, meta = report["real"], report["meta_llava_7b"]
    assert real["dtype"] == "bf16" and real["seq"] >= 60 and real["image_tokens"] == 16
    assert len(real["step_s"]) == 2 and len(real["losses"]) == 2 and len(real["generated"]) == 3
    assert real["mores_orthonormality_error"] < 1e-5 and real["peak_rss_gib"] > 0
    assert real["tp_star"] == 2 * (2 * 64 + 1)  # MoReS-B on 2 layers of width 64
    assert meta["image_tokens"] == 576 and meta["llm_layers"] == 32 and meta["hidden"] == 4096
    assert meta["tp_star"] == 262_176 and meta["connector_output"] == [2, 576, 4096]
    assert meta["positions"] == meta["positions_expected"] and len(meta["positions"][0]) == 9
    assert meta["seq"] > 576 and meta["deepspeed"]["gradient_accumulation_steps"] == 8
    # a second run into the same folder is refused instead of overwriting the results
    assert smoke_real_size.main(["--model", "", "--meta", "", "--out", str(tmp_path)]) == 2
