"""`python eval.py key=value ...`: evaluate a checkpoint on a benchmark, or run the modality-imbalance analysis.

eval.py is a Hydra app: configs/eval.yaml with the groups `benchmark` (configs/benchmark/) and `debug`
(configs/debug/fast.yaml), overridden by ``key=value`` arguments (e.g. ``imbalance.num_samples=50``). The settings
are checked (factory/config_checks.py) before the model is rebuilt from the checkpoint folder alone
(factory.load_checkpoint). `main(argv)` runs the same in-process.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from factory.checkpoint import checkpoint_folder, load_checkpoint
from factory.command_line import compose_app, missing_checkpoint
from factory.config import CONFIG_DIR
from factory.config_checks import check_eval_config
from factory.errors import FactoryError
from factory.eval.generate import check_image_paths, load_questions
from factory.eval.imbalance import analyze, write_results
from factory.eval.official import check_protocol
from factory.eval.output_folder import (checkpoint_identity, ensure_writable_dir, generation_settings,
                                        keyed_output_dir)
from factory.eval.plots import plot_imbalance
from factory.eval.benchmark_run import run_benchmark
from factory.registry import HARNESSES

ROOT_CONFIG = "eval"  # configs/eval.yaml
USAGE = "e.g. checkpoint=runs/x/instruct benchmark=pope"


def load_config(argv: List[str]) -> DictConfig:
    """The checked config of `python eval.py <argv>`, composed by Hydra exactly as the app composes it."""
    return checked(compose_app(argv, ROOT_CONFIG, "eval.py", USAGE))


def checked(cfg: DictConfig) -> DictConfig:
    """Types and ranges (batch_size, limit, dtype...) and the checkpoint key, before the model is loaded."""
    check_eval_config(cfg, CONFIG_DIR / f"{ROOT_CONFIG}.yaml")
    problem = missing_checkpoint(cfg, "eval.py")
    if problem:
        raise FactoryError(problem)
    return cfg


def pick_device(setting: str) -> str:
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def load_model(cfg: DictConfig):
    device = pick_device(cfg.device)
    dtype = cfg.dtype or (torch.bfloat16 if device.startswith("cuda") else None)
    return load_checkpoint(cfg.checkpoint, device=device, dtype=dtype,
                           trust_remote_code=remote_code_opt_in(cfg, "eval.py"))


def remote_code_opt_in(cfg: Any, command: str) -> bool:
    """`trust_remote_code=true|false` on the command line (the only way to let a checkpoint's models run code)."""
    value = cfg.get("trust_remote_code", False)
    if not isinstance(value, bool):
        raise FactoryError(f"trust_remote_code={value!r} on the {command} command line must be true or false.")
    return value


def output_dir_for(cfg: DictConfig, checkpoint: Path, default_name: str) -> Path:
    """`output_dir`, or the default `<checkpoint>/eval/<name>`, checked before the model is loaded: a file in the
    way or a read-only / full disk is reported with the folder and the fix."""
    if cfg.output_dir:
        return ensure_writable_dir(Path(cfg.output_dir))
    hint = (f"This is the default output folder, inside the checkpoint {checkpoint} (a read-only or shared "
            "checkpoint cannot hold it). ")
    return ensure_writable_dir(checkpoint / "eval" / default_name, hint)


def checkpoint_config(checkpoint: Path) -> Dict[str, Any]:
    path = Path(checkpoint) / "config.yaml"
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else {}


def _microworld_defaults(cfg: DictConfig, train_cfg: Dict[str, Any]) -> None:
    """For benchmark=microworld, the question file and images default to the checkpoint's own data.eval."""
    data_eval = (train_cfg.get("data") or {}).get("eval") or {}
    root = (train_cfg.get("data") or {}).get("root")
    def resolve(value):
        return str(value).replace("${data.root}", str(root)) if value is not None else None
    if cfg.question_file is None and data_eval.get("json"):
        cfg.question_file = resolve(data_eval["json"])
    if cfg.image_folder is None and data_eval.get("image_folder"):
        cfg.image_folder = resolve(data_eval["image_folder"])


def run(cfg: DictConfig) -> Dict[str, Any]:
    if cfg.get("harness") is not None:  # `harness=lm_eval`: an external harness, found by its config's name
        return HARNESSES.get(str(cfg.harness.get("name")))(cfg)
    checkpoint = checkpoint_folder(cfg.checkpoint)  # hf:<dir> → <dir> (the default output folder goes inside)
    train_cfg = checkpoint_config(checkpoint)
    if cfg.benchmark == "microworld":
        _microworld_defaults(cfg, train_cfg)
    if cfg.question_file is None:
        raise FactoryError(f"eval.py needs question_file=<LLaVA question file> for benchmark {cfg.benchmark!r}.")
    image_folder = Path(cfg.image_folder) if cfg.image_folder else None
    check_protocol(str(cfg.protocol))  # a typo fails before the model is loaded
    out_dir = output_dir_for(cfg, checkpoint, "imbalance" if cfg.analysis == "imbalance" else str(cfg.benchmark))
    model = load_model(cfg)
    eval_settings = OmegaConf.to_container(cfg, resolve=True)
    if cfg.analysis == "imbalance":
        return run_imbalance(cfg, model, checkpoint, image_folder, train_cfg, out_dir)
    if cfg.analysis is not None:
        raise FactoryError(f"analysis={cfg.analysis!r} is unknown; the available analysis is `imbalance`.")
    return run_benchmark(
        model, cfg.benchmark, Path(cfg.question_file), out_dir, image_folder=image_folder,
        annotations=Path(cfg.annotations) if cfg.annotations else None, batch_size=int(cfg.batch_size),
        max_new_tokens=cfg.max_new_tokens, limit=cfg.limit, model_id=cfg.model_id or str(checkpoint),
        skip_missing_images=bool(cfg.skip_missing_images),
        submission_questions=Path(cfg.submission_questions) if cfg.submission_questions else None,
        config={"eval": eval_settings, "checkpoint_config": train_cfg}, merge_wait_s=float(cfg.merge_wait_s),
        identity=checkpoint_identity(checkpoint), protocol=str(cfg.protocol), seed=int(cfg.seed),
        allow_outside_paths=bool(cfg.allow_outside_paths),
    )


def run_imbalance(cfg: DictConfig, model, checkpoint: Path, image_folder: Optional[Path],
                  train_cfg: Dict[str, Any], out_dir: Path) -> Dict[str, Any]:
    opts = cfg.imbalance
    label = opts.label or (train_cfg.get("tuner") or {}).get("name") or checkpoint.name
    # an earlier analysis with other settings keeps its files: this one then goes to the keyed sibling folder
    settings = generation_settings(model, "imbalance", Path(cfg.question_file), image_folder, int(opts.max_new_tokens),
                                   checkpoint_identity(checkpoint),
                                   extra={"num_samples": opts.num_samples, "text_tokens": str(opts.text_tokens),
                                          "label": str(label), "compare": [str(p) for p in opts.compare]})
    out_dir = keyed_output_dir(out_dir, settings)
    questions = load_questions(Path(cfg.question_file))
    check_image_paths(questions, image_folder, bool(cfg.allow_outside_paths))
    result = analyze(model, questions, image_folder, num_samples=opts.num_samples,
                     max_new_tokens=opts.max_new_tokens, text_tokens=opts.text_tokens, batch_size=opts.batch_size,
                     label=str(label))
    result["checkpoint"] = str(checkpoint)
    result["config"] = {"eval": OmegaConf.to_container(cfg, resolve=True)}
    out_json = write_results(result, out_dir / "imbalance.json")
    png = plot_imbalance([result, *[Path(p) for p in opts.compare]], out_dir / "imbalance.png")
    return {"analysis": "imbalance", "json": str(out_json), "png": str(png), "output_dir": str(out_dir),
            "n_samples": result["n_samples"],
            "lmar": result["lmar"], "visual_share": result["visual_share"]}


def main(argv: Optional[List[str]] = None) -> int:
    """`python eval.py <argv>` in-process: compose, check, run; prints the summary line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(argv)
    except FactoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run_app(cfg)


def run_app(cfg: DictConfig) -> int:
    """The job of eval.py's Hydra app (and of `main`): check, run, print one JSON summary line (rank 0)."""
    try:
        result = run(checked(cfg))
    except FactoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result is not None:  # rank 0: one JSON line with the results
        summary = {k: v for k, v in result.items() if k != "config"}
        print(json.dumps(summary, sort_keys=True, default=str))
    return 0
