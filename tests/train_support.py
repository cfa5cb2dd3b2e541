"""Shared setup of the training tests: a small micro-world and a config for the tiny random model.

The config is assembled from the project's own YAML files (stage, trainer, deepspeed, tuner) plus
factory.testing.tiny_config, so the tests exercise the shipped settings without needing the shipped assets.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
WORLD_SIZES = {"num_train_images": 64, "num_eval_images": 16, "num_pope_images": 4, "image_size": 32}


def make_small_world(root: Path) -> Path:
    from factory.data.microworld import generate_microworld

    generate_microworld(root, seed=0, **WORLD_SIZES)
    return root


def train_cfg(run_dir: Path, world: Path, tuner: str = "full", stage: str = "all", **overrides: Any) -> DictConfig:
    """A run config: tiny random model, `world` data, micro-batch 4 / global 8, wandb off. `overrides` are
    dotted keys (e.g. **{"trainer.max_steps": 3})."""
    from factory.testing import tiny_config

    world = Path(world)
    cfg = OmegaConf.merge(tiny_config(), {
        "stage": OmegaConf.load(CONFIGS / "stage" / f"{stage}.yaml"),
        "trainer": OmegaConf.load(CONFIGS / "trainer" / "microworld.yaml"),
        "deepspeed": OmegaConf.load(CONFIGS / "deepspeed" / "zero2.yaml"),
        "tuner": OmegaConf.load(CONFIGS / "tuner" / f"{tuner}.yaml"),
        "logger": {"name": "none"},
        "eval": {"enabled": False},
        "data": {"name": "files",
                 "pretrain": {"json": str(world / "pretrain.json"), "image_folder": str(world / "images")},
                 "instruct": {"json": str(world / "instruct.json"), "image_folder": str(world / "images")},
                 "eval": {"json": str(world / "eval.json"), "image_folder": str(world / "images")}},
        "run_dir": str(run_dir),
        "resume": False,
    })
    # stage/*.yaml use Hydra defaults lists; outside Hydra, fold all.yaml in by hand
    if "defaults" in cfg.stage:
        base = OmegaConf.load(CONFIGS / "stage" / "all.yaml")
        stage_cfg = OmegaConf.merge(base, cfg.stage)
        del stage_cfg["defaults"]
        cfg.stage = stage_cfg
    for stage_name in ("pretrain", "instruct"):
        cfg.trainer[stage_name].global_batch_size = 8
        cfg.trainer[stage_name].micro_batch_size = 4
    cfg.trainer.max_length = 128
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def read_metrics(run_dir: Path):
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
