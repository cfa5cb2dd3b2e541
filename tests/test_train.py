"""Two-stage training on the tiny model: loss falls, metrics.jsonl, max_steps, checkpoints, grad accumulation,
the batch plan, and exact resume."""
import json

import pytest
import yaml
import torch

from factory import checkpoint as ckpt
from factory.train.optim import cosine_with_warmup
from factory.train.sampler import BatchPlan, GlobalBatchSampler
from train_support import make_small_world, read_metrics, train_cfg


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_small_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def two_stage_run(world, tmp_path_factory):
    from factory.train import run

    run_dir = tmp_path_factory.mktemp("run")
    # instruct: 64 samples / global 8 = 8 steps per epoch × 2 epochs = 16, capped at 10 by max_steps
    cfg = train_cfg(run_dir, world, tuner="full", **{"trainer.max_steps": 10, "trainer.pretrain.epochs": 0.5,
                                                     "trainer.instruct.lr": 1e-3})
    return run_dir, run(cfg)


def test_two_stage_run_loss_falls(two_stage_run):
    run_dir, summary = two_stage_run
    instruct = [r["loss"] for r in read_metrics(run_dir) if r["stage"] == "instruct"]
    assert summary["run_dir"] == str(run_dir)
    assert set(summary["stages"]) == {"pretrain", "instruct"}
    # full tuning of the tiny LLM at lr 1e-3: the answer tokens become much likelier within 10 steps
    assert sum(instruct[-3:]) / 3 < sum(instruct[:3]) / 3 - 0.5
    assert summary["instruct_final_loss"] == pytest.approx(instruct[-1])


def test_metrics_jsonl_one_line_per_step_and_max_steps(two_stage_run):
    run_dir, _ = two_stage_run
    records = read_metrics(run_dir)
    stages = [r["stage"] for r in records]
    assert stages == ["pretrain"] * 4 + ["instruct"] * 10  # pretrain: 0.5 epoch of 8 steps; instruct: max_steps
    assert [r["step"] for r in records[4:]] == list(range(1, 11))
    for r in records:
        assert {"stage", "step", "loss", "lr", "samples_per_s", "tokens_per_s", "epoch"} <= set(r)
        assert r["samples_per_s"] > 0 and r["loss"] > 0
    assert records[3]["epoch"] == pytest.approx(0.5)
    lrs = [r["lr"] for r in records[4:]]
    assert max(lrs) == pytest.approx(1e-3) and lrs[-1] < lrs[2]  # warmup to the peak, then cosine decay


def test_stage_checkpoints_layout(two_stage_run):
    run_dir, _ = two_stage_run
    for stage in ("pretrain", "instruct"):
        folder = run_dir / stage
        assert {p.name for p in folder.iterdir()} >= {"config.yaml", "trainable.safetensors", "meta.json"}
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["stage"] == stage and meta["complete"] and meta["image_token_count"] == 16
        # provenance of how prompts were built, even when the data config does not name data.image_first (as here)
        assert meta["image_first"] is True
        assert "image_first" not in yaml.safe_load((folder / "config.yaml").read_text())["data"]
    assert json.loads((run_dir / "pretrain" / "meta.json").read_text())["template"] == "plain"
    assert json.loads((run_dir / "instruct" / "meta.json").read_text())["template"] == "phi"
    # stage 1 saves only the connector; stage 2 (full tuning) the connector and the LLM, never the vision tower
    names1 = ckpt.load_weights_file(run_dir / "pretrain").keys()
    names2 = ckpt.load_weights_file(run_dir / "instruct").keys()
    assert names1 and all(n.startswith("connector.") for n in names1)
    assert any(n.startswith("llm.") for n in names2) and not any(n.startswith("vision.") for n in names2)
    assert not list(run_dir.glob(".*.tmp")) and not list(run_dir.glob(".*.old"))


def test_stage2_starts_from_stage1_weights(two_stage_run, world, tmp_path):
    """stage=instruct with stage.init_from loads exactly the stage-1 connector before training."""
    from factory.train.recipe import build_stage_model
    from factory.stages import plan_stages

    run_dir, _ = two_stage_run
    cfg = train_cfg(tmp_path, world, stage="instruct", **{"stage.init_from": str(run_dir / "pretrain")})
    model = build_stage_model(cfg, plan_stages(cfg)[0], run_dir / "pretrain", torch.float32)
    saved = ckpt.load_weights_file(run_dir / "pretrain")
    for name, tensor in saved.items():
        assert torch.equal(dict(model.named_parameters())[name].detach(), tensor)


def test_grad_accumulation_matches_one_big_micro_batch(world, tmp_path):
    """2 micro-batches of 4 == 1 micro-batch of 8 (global-token-mean loss), up to fp32 summation order."""
    from factory.train import run

    results = {}
    for micro in (4, 8):
        run_dir = tmp_path / f"micro{micro}"
        cfg = train_cfg(run_dir, world, stage="pretrain",
                        **{"trainer.max_steps": 3, "trainer.pretrain.micro_batch_size": micro})
        run(cfg)
        results[micro] = ([r["loss"] for r in read_metrics(run_dir)], ckpt.load_weights_file(run_dir / "pretrain"))
    assert results[4][0] == pytest.approx(results[8][0], rel=1e-5)
    for name, tensor in results[4][1].items():
        torch.testing.assert_close(tensor, results[8][1][name], rtol=1e-4, atol=1e-6)


def test_batch_plan_is_exact_and_process_count_independent():
    one = GlobalBatchSampler(BatchPlan(num_samples=20, micro_batch_size=2, grad_accum=4, world_size=1), 0, 7, 6)
    two = [GlobalBatchSampler(BatchPlan(num_samples=20, micro_batch_size=2, grad_accum=2, world_size=2), r, 7, 6)
           for r in (0, 1)]
    assert one.plan.steps_per_epoch == 3  # 20 samples, global batch 8 → the last step wraps around
    for step in range(6):
        samples_one = sorted(i for mb in one.step_indices(step) for i in mb)
        samples_two = sorted(i for s in two for mb in s.step_indices(step) for i in mb)
        assert samples_one == samples_two and len(samples_one) == 8
    epoch0 = [i for step in range(3) for mb in one.step_indices(step) for i in mb]
    assert set(epoch0) == set(range(20))  # every sample once per epoch (+4 wrapped repeats)
    assert list(GlobalBatchSampler(one.plan, 0, 7, 6, start_step=4)) == list(one)[4 * 4:]  # resume = skip steps
    assert one.step_indices(3) != one.step_indices(0)  # a new permutation each epoch


def test_cosine_schedule_with_warmup():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, total_steps=100, warmup_ratio=0.03)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.25) and lrs[2] == pytest.approx(0.75) and lrs[3] == pytest.approx(1.0)
    assert lrs[50] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(47 / 97 * torch.pi)).item()), rel=1e-6)
    assert lrs[-1] < 1e-3


def test_resume_continues_exactly(world, tmp_path, monkeypatch):
    """An interrupted run resumed with resume=true logs the same losses as an uninterrupted one (bitwise on CPU)."""
    from factory.train import loop, run

    overrides = {"trainer.max_steps": 4, "trainer.save_every": 2}
    run(train_cfg(tmp_path / "straight", world, stage="pretrain", **overrides))
    straight = read_metrics(tmp_path / "straight")

    class Interrupted(Exception):
        pass

    real_save = ckpt.save_stage_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Interrupted  # right after the mid-stage checkpoint at step 2

    monkeypatch.setattr(loop.ckpt, "save_stage_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        run(train_cfg(tmp_path / "resumed", world, stage="pretrain", **overrides))
    monkeypatch.setattr(loop.ckpt, "save_stage_checkpoint", real_save)
    assert json.loads((tmp_path / "resumed" / "pretrain" / "meta.json").read_text())["step"] == 2
    # the mid-stage checkpoint holds the optimizer state to resume from; the finished one (below) does not
    assert (tmp_path / "resumed" / "pretrain" / ckpt.ENGINE_DIR).is_dir()
    assert not (tmp_path / "straight" / "pretrain" / ckpt.ENGINE_DIR).exists()

    run(train_cfg(tmp_path / "resumed", world, stage="pretrain", resume=True, **overrides))
    resumed = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    a = ckpt.load_weights_file(tmp_path / "straight" / "pretrain")
    b = ckpt.load_weights_file(tmp_path / "resumed" / "pretrain")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_py_moves_local_rank_argument_to_the_environment(monkeypatch):
    """The deepspeed launcher appends --local_rank=N, which Hydra would reject as an override."""
    import importlib.util

    from train_support import REPO

    spec = importlib.util.spec_from_file_location("train_entry", REPO / "train.py")
    train_entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_entry)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert train_entry._take_local_rank_argument(["tuner=lora", "--local_rank=3", "seed=1"]) == ["tuner=lora", "seed=1"]
    assert __import__("os").environ["LOCAL_RANK"] == "3"
    assert train_entry._take_local_rank_argument(["--local_rank", "1"]) == []
    assert __import__("os").environ["LOCAL_RANK"] == "1"


def test_microworld_run_ends_with_evaluation(world, tmp_path):
    """The default flow (mores tuner, micro-world data) ends with the held-out evaluation in the summary."""
    from train_support import WORLD_SIZES

    from factory.train import run

    cfg = train_cfg(tmp_path / "run", world, tuner="mores",
                    **{"trainer.max_steps": 2, "data.name": "microworld", "data.root": str(world),
                       "data.seed": 0, "data.generate": False, "data.sizes": dict(WORLD_SIZES),
                       "eval": {"name": "microworld", "enabled": True, "batch_size": 8, "max_new_tokens": 4,
                                "limit": 8}})
    summary = run(cfg)
    assert 0.0 <= summary["microworld_accuracy"] <= 100.0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["microworld_accuracy"] == \
        summary["microworld_accuracy"]
    assert any("mores" in k for k in ckpt.load_weights_file(tmp_path / "run" / "instruct"))


def test_wandb_offline_writes_a_local_run(tmp_path, monkeypatch):
    from factory.train.metrics import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger({"name": "wandb", "mode": "offline", "project": "factory-test"}, tmp_path, {"a": 1}, True)
    logger.log({"stage": "pretrain", "step": 1, "loss": 1.5}, step=1)
    logger.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert WandbLogger({"name": "wandb", "mode": "offline"}, tmp_path, {}, True).run is None
    assert WandbLogger({"name": "none"}, tmp_path, {}, True).run is None


def test_stage_model_is_seeded(world, tmp_path):
    """Connector and tuner initialisation come from cfg.seed (not the ambient RNG): same seed, same model."""
    from factory.train.recipe import build_stage_model
    from factory.stages import plan_stages

    cfg = train_cfg(tmp_path, world, tuner="mores")
    spec = plan_stages(cfg)[1]
    torch.manual_seed(123)
    a = build_stage_model(cfg, spec, None, torch.float32).trainable_state_dict()
    torch.manual_seed(456)
    b = build_stage_model(cfg, spec, None, torch.float32).trainable_state_dict()
    cfg.seed = 1
    c = build_stage_model(cfg, spec, None, torch.float32).trainable_state_dict()
    assert any("mores" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("data, expected", [({"image_first": False}, False), ({"image_first": True}, True),
                                            ({}, True)])
def test_stage_meta_records_the_image_placement_training_used(data, expected):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from factory.train.loop import stage_meta

    cfg = OmegaConf.create({"tuner": {"name": "full"}, "vision": {}, "llm": {}, "data": data})
    spec = SimpleNamespace(name="instruct", template="phi", tune={"llm": "full"})
    plan = SimpleNamespace(steps_per_epoch=1, num_samples=8, global_batch_size=8)
    meta = stage_meta(spec, cfg, SimpleNamespace(image_token_count=4), plan, step=1, total_steps=1)
    assert meta["image_first"] is expected
