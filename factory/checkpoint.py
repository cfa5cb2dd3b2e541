"""Stage checkpoints: `<run_dir>/<stage>/` = config.yaml (resolved) + trainable.safetensors + meta.json
(+ `deepspeed/`, the engine's resume state, when `trainer.save_every` or `resume` is used).

Only trained weights are saved (connector, tuner weights, a fully tuned LLM); frozen weights come back from the
config's `path`s when `load_checkpoint` rebuilds the model. A folder is always written completely under a temporary
name and then renamed into place, so a crash during a save leaves the previous checkpoint usable. A mid-stage
checkpoint has the same layout with `"complete": false` in meta.json.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from factory.distributed import barrier
from factory.errors import FactoryError
from factory.model.build import build_model
from factory.model.loading import cast_parameters, resolve_dtype
from factory.registry import CHECKPOINT_IMPORTERS
from factory.safe_load import check_remote_code, load_torch_file
from factory.stages import tune_for_stage
from factory.tuners import apply_tuning

CONFIG_FILE, WEIGHTS_FILE, META_FILE, ENGINE_DIR = "config.yaml", "trainable.safetensors", "meta.json", "deepspeed"
ENGINE_TAG = "state"


# ----------------------------------------------------------------------------------------------------------- save
def gather_trainable_state(engine) -> Dict[str, torch.Tensor]:
    """The model's trainable weights as full CPU tensors. Under ZeRO-3 each rank holds a shard of every parameter,
    so the trainable ones are gathered first (a collective: every rank must call this)."""
    model = engine.module if engine is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    if engine is not None and engine.zero_optimization_stage() == 3:
        import deepspeed  # heavy (seconds to import): only ZeRO-3 saves need it, never eval's loads

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone().contiguous() for k, v in model.trainable_state_dict().items()}
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.trainable_state_dict().items()}


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy_keys": torch.from_numpy(np_state[1].astype("int64")), "numpy_pos": int(np_state[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype("uint32"), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_stage_checkpoint(engine, cfg: DictConfig, out_dir: Path, meta: Dict[str, Any], rank: int,
                          with_engine_state: bool) -> Path:
    """Write `out_dir` atomically from every rank (collective). `meta` holds the stage facts (see stage_meta)."""
    out_dir = Path(out_dir)
    tmp, old = out_dir.with_name(f".{out_dir.name}.tmp"), out_dir.with_name(f".{out_dir.name}.old")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    state = gather_trainable_state(engine)
    if rank == 0:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if with_engine_state:
        # Frozen weights are excluded: they are rebuilt from the config, and would make every save as big as the model.
        engine.save_checkpoint(str(tmp / ENGINE_DIR), tag=ENGINE_TAG, exclude_frozen_parameters=True)
        torch.save(_rng_state(), tmp / ENGINE_DIR / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)  # left over by a crash after an earlier commit
            out_dir.rename(old)
        tmp.rename(out_dir)  # the commit point; `recover_interrupted_save` handles a crash right before it
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return out_dir


def recover_interrupted_save(out_dir: Path) -> None:
    """A crash between the two renames of a save leaves only `.<stage>.old`: put it back. A crash after the commit
    but before the cleanup leaves both: the new folder is the valid one."""
    out_dir = Path(out_dir)
    old = out_dir.with_name(f".{out_dir.name}.old")
    if not out_dir.exists() and (old / META_FILE).is_file():
        old.rename(out_dir)
    elif out_dir.exists() and old.exists():
        shutil.rmtree(old, ignore_errors=True)


def load_engine_state(engine, ckpt_dir: Path, rank: int) -> None:
    """Restore optimizer, scheduler, trainable weights and this rank's RNG from a checkpoint's `deepspeed/`."""
    engine_dir = Path(ckpt_dir) / ENGINE_DIR
    if not (engine_dir / ENGINE_TAG).is_dir():
        raise FactoryError(
            f"{ckpt_dir} holds no resume state ({engine_dir}/{ENGINE_TAG} is missing), so the stage cannot continue "
            "mid-way. Checkpoints written with trainer.save_every=N carry it; start a new run_dir, or resume=false."
        )
    # imports deepspeed (seconds): only a resume needs it, never eval's load_checkpoint
    from factory.safe_checkpoint_engine import SafeTorchCheckpointEngine

    if not isinstance(getattr(engine, "checkpoint_engine", None), SafeTorchCheckpointEngine):
        # another engine (a `checkpoint.writer` / datastates DeepSpeed config) would read the files with full pickle
        raise FactoryError(
            f"Cannot resume from {engine_dir}: the DeepSpeed config selects the checkpoint engine "
            f"{type(getattr(engine, 'checkpoint_engine', None)).__name__}, which loads files with full pickle (a "
            "crafted file could run code). Remove the `checkpoint` writer / `datastates` section from the deepspeed "
            "config to resume."
        )
    rng_file = engine_dir / f"rng_rank{rank}.pt"
    # read (and vet) this rank's RNG file before DeepSpeed touches the engine
    rng_state = load_torch_file(rng_file) if rng_file.is_file() else None
    load_path, _ = engine.load_checkpoint(str(engine_dir), tag=ENGINE_TAG, load_module_strict=False)
    if load_path is None:
        raise FactoryError(f"DeepSpeed could not read the resume state in {engine_dir}. Start a new run_dir.")
    if rng_state is not None:
        _set_rng_state(rng_state)


# ----------------------------------------------------------------------------------------------------------- read
def read_meta(path: Path) -> Dict[str, Any]:
    """meta.json of a checkpoint folder, or a FactoryError that says what the folder is missing."""
    path = Path(str(path)).expanduser()
    if not path.is_dir():
        raise FactoryError(
            f"Checkpoint folder {path} does not exist. Pass a `<run_dir>/<stage>` folder written by train.py "
            "(it holds config.yaml, trainable.safetensors and meta.json)."
        )
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, META_FILE) if not (path / f).is_file()]
    if missing:
        raise FactoryError(
            f"{path} is not a factory checkpoint: {', '.join(missing)} missing. Pass a `<run_dir>/<stage>` folder "
            "written by train.py (e.g. outputs/<date>/<time>/pretrain)."
        )
    try:
        meta = json.loads((path / META_FILE).read_text())
    except json.JSONDecodeError as err:
        raise FactoryError(f"{path / META_FILE} is not valid JSON ({err}); the checkpoint is damaged.") from None
    if not isinstance(meta, dict) or "stage" not in meta:
        raise FactoryError(f"{path / META_FILE} has no `stage` entry; it was not written by train.py.")
    return meta


def require_stage1_checkpoint(path: Path, key: str = "stage.init_from") -> Dict[str, Any]:
    """Stage 2 starts from a finished stage-1 (pretrain) checkpoint; anything else is a configuration error."""
    meta = read_meta(path)
    if meta["stage"] != "pretrain" or not meta.get("complete", True):
        what = "an unfinished pretrain checkpoint" if meta["stage"] == "pretrain" else f"a {meta['stage']!r} checkpoint"
        raise FactoryError(
            f"`{key}` points at {path}, which is {what}; stage 2 (instruct) must start from a finished stage-1 "
            "checkpoint: the `<run_dir>/pretrain` folder of a run that completed stage=pretrain."
        )
    return meta


def load_weights_file(path: Path) -> Dict[str, torch.Tensor]:
    file = Path(path) / WEIGHTS_FILE
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own error types for truncated / garbled headers
        raise FactoryError(
            f"{file} cannot be read ({type(err).__name__}: {err}); the file is corrupt or truncated. "
            "Re-run the stage that wrote it, or point at another checkpoint."
        ) from None


def load_trainable_into(model, path: Path) -> None:
    """Copy a checkpoint's trained weights into a model tuned the same way (strict on names and shapes)."""
    state = load_weights_file(path)
    try:
        model.load_trainable_state_dict(state)
    except FactoryError as err:
        raise FactoryError(f"{Path(path) / WEIGHTS_FILE} does not fit the model built from the config: {err}") from None


def restore_trained_weights(model, path: Path, cfg: DictConfig, meta: Dict[str, Any]) -> None:
    """Tune `model` the way the checkpoint's stage did (meta.json records it; a folder without that entry falls back
    to the stage plan of its config), then copy the trained weights in. One path for load_checkpoint and for
    stage 2 starting from stage 1."""
    apply_tuning(model, cfg.tuner, meta.get("tune") or tune_for_stage(cfg, meta["stage"]))
    load_trainable_into(model, path)


# ------------------------------------------------------------------------------------- folders of other projects
def imported_source(value: Any) -> Optional[Tuple[str, Path]]:
    """`hf:<dir>` → ("hf", <dir>): a folder another project saved, read by the importer registered for the scheme in
    registry.CHECKPOINT_IMPORTERS (factory/interop). None for a plain path (an existing path whose name holds a
    colon stays a path)."""
    text = str(value)
    scheme, sep, rest = text.partition(":")
    if not sep or len(scheme) < 2 or not scheme.isidentifier() or Path(text).expanduser().exists():
        return None  # no scheme (a one-letter prefix is a Windows drive)
    if scheme not in CHECKPOINT_IMPORTERS:
        raise FactoryError(
            f"{text!r} is neither an existing folder nor `<scheme>:<folder>` with a known scheme (known: "
            f"{', '.join(f'{n}:' for n in CHECKPOINT_IMPORTERS.names())}). Pass a `<run_dir>/<stage>` folder or e.g. "
            "hf:<folder of a HF Llava checkpoint>.")
    if not rest:
        raise FactoryError(f"{text!r} names no folder after `{scheme}:`; write {scheme}:<folder>.")
    return scheme, Path(rest).expanduser()


def checkpoint_folder(value: Any) -> Path:
    """The folder a `checkpoint=` argument names: `<run_dir>/<stage>`, or the folder of `<scheme>:<folder>`."""
    source = imported_source(value)
    return source[1] if source else Path(str(value)).expanduser()


def import_model(value: Any, dtype: Optional[Any] = None, template: Optional[str] = None):
    """The LlavaModel of `<scheme>:<folder>` (e.g. hf:<dir>), built by the registered importer."""
    scheme, folder = imported_source(value)
    return CHECKPOINT_IMPORTERS.get(scheme)(folder, dtype=dtype, template=template)


def build_base_model(cfg: DictConfig, dtype: Optional[Any] = None):
    """The model a stage starts from before its tuning: `build_model(cfg)`, or, when `stage.init_from` is
    `<scheme>:<folder>`, the imported folder (its config defines vision, connector and LLM; the stage's template
    is used for training, so no template matching is needed)."""
    source = (cfg.get("stage") or {}).get("init_from")
    if source and imported_source(source):
        return import_model(source, dtype=dtype, template=str(cfg.llm.get("template") or "plain"))
    return build_model(cfg, dtype=dtype)


def load_checkpoint(path, device: str = "cpu", dtype: Optional[Any] = None, trust_remote_code: bool = False):
    """Rebuild a LlavaModel from a checkpoint folder alone: config.yaml → build_model (frozen weights from the
    recorded paths) → apply_tuning as recorded → trained weights from trainable.safetensors.

    A config.yaml that sets `trust_remote_code` is refused unless the caller passes trust_remote_code=True (eval.py
    and chat.py: `trust_remote_code=true` on the command line): a checkpoint must not switch on code execution.

    `path` may also be `<scheme>:<folder>` (e.g. `hf:<dir>`, a HF Llava checkpoint), imported as it is."""
    if imported_source(path):
        return import_model(path, dtype=dtype).to(device).eval()
    path = Path(str(path)).expanduser()
    meta = read_meta(path)
    try:
        cfg = OmegaConf.load(path / CONFIG_FILE)
    except Exception as err:
        raise FactoryError(f"{path / CONFIG_FILE} is not a readable YAML config ({err}).") from None
    check_remote_code(cfg, path / CONFIG_FILE, allowed=bool(trust_remote_code))
    recorded_init = cfg.get("init", "pretrained")
    # Frozen weights are never saved: they must come from somewhere reproducible. `random` frozen weights are
    # reproducible from the recorded seed (the run built them under that seed, like we do here).
    cfg.init = "random" if recorded_init == "random" else "pretrained"
    torch.manual_seed(int(meta.get("seed", cfg.get("seed", 0))))
    model = build_base_model(cfg, dtype=dtype)
    restore_trained_weights(model, path, cfg, meta)
    model.template = meta.get("template", model.template)
    if dtype is not None:  # as the bf16/fp32 engine held it in training, tuner weights included (PEFT keeps fp32)
        cast_parameters(model, resolve_dtype(dtype))
    return model.to(device).eval()
