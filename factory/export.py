"""`python -m factory.export checkpoint=<run>/<stage> out=<dir>`: a factory checkpoint as a transformers
LlavaForConditionalGeneration folder (the llava-hf layout, docs/interop.md).

    python -m factory.export checkpoint=outputs/<run>/instruct out=exports/my-llava [overwrite=true]
        [trust_remote_code=false]

`full` and `frozen` checkpoints export directly, PEFT tuners (lora, ia3, oft) are merged into the weights, MoReS and
the adapter are written beside the base model as tuner files (factory/interop/tuner_files.py; `factory.hf.attach`
hooks them into the loaded HF model). What HF Llava cannot hold exactly is refused with the reason. `out` must not
exist unless overwrite=true; the folder is written under a temporary name and renamed into place, so a failed
export leaves nothing behind. Exit code 2 and one message for every user error.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import OmegaConf

from factory import checkpoint as ckpt
from factory.command_line import USER_ERROR
from factory.errors import FactoryError
from factory.interop.hf_llava_export import write_hf_llava
from factory.interop.tuner_files import ATTACHABLE, write_tuner_files

USAGE = "python -m factory.export checkpoint=<run_dir>/<stage> out=<new folder> [overwrite=true]"
# transformers picks the torchvision image processor by default; only the PIL one resizes as the factory does.
PROCESSOR_NOTE = ("load the processor with AutoProcessor.from_pretrained(out, backend='pil') for the factory's exact "
                  "pixels; the default torchvision backend resizes differently (about 0.01 in normalised pixels).")
SETTINGS = {"checkpoint": None, "out": None, "overwrite": False, "trust_remote_code": False}


def parse_args(argv: List[str]) -> Dict[str, Any]:
    settings = dict(SETTINGS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in SETTINGS:
            raise FactoryError(f"Unknown argument {arg!r} ({USAGE}). Known keys: {', '.join(SETTINGS)}.")
        if isinstance(SETTINGS[key], bool):
            if value.lower() not in ("true", "false"):
                raise FactoryError(f"{key}={value!r} must be true or false.")
            settings[key] = value.lower() == "true"
        else:
            settings[key] = value
    missing = [k for k in ("checkpoint", "out") if not settings[k]]
    if missing:
        raise FactoryError(f"factory.export needs {' and '.join(f'{k}=' for k in missing)} ({USAGE}).")
    return settings


def prepare_out(out: Path, overwrite: bool) -> Path:
    """The temporary folder to write into; an existing `out` is refused unless overwrite=true."""
    if out.exists() and not overwrite:
        raise FactoryError(f"{out} already exists; an export never replaces a folder silently. Choose a new out=, "
                           "or pass overwrite=true to replace it.")
    if out.exists() and not out.is_dir():
        raise FactoryError(f"{out} exists and is not a folder; choose another out=.")
    tmp = out.with_name(f".{out.name}.export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def base_without_tuner(path: Path, meta: Dict[str, Any]):
    """For MoReS / adapter: the stage's model without its tuner (base weights + every trained weight that is not
    the tuner's: the connector, a tuned vision tower), the part HF Llava holds."""
    cfg = OmegaConf.load(path / ckpt.CONFIG_FILE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(meta.get("seed", cfg.get("seed", 0))))
        base = ckpt.build_base_model(cfg)
    own = base.state_dict()
    trained = ckpt.load_weights_file(path)
    tuner_free = {k: v for k, v in trained.items() if k in own}
    left = sorted(set(trained) - set(tuner_free))
    if any(meta.get("tuner", "") not in name for name in left):
        strays = [n for n in left if meta.get("tuner", "") not in n]
        raise FactoryError(f"{path}: trained weights {strays[:3]} belong neither to the base model nor to the "
                           f"{meta.get('tuner')} tuner; they cannot be exported.")
    with torch.no_grad():
        for name, value in tuner_free.items():
            own[name].copy_(value)
    base.template = meta.get("template", base.template)
    return base


def without_mores(model):
    """The imported model with its MoReS taken off (after its tuner files are written): the base HF Llava holds.
    Importers attach MoReS only (the adapter is never imported), so anything else is named."""
    mores = getattr(model.llm, "mores", None)
    if getattr(model, "applied_tuner", None) != "mores" or mores is None:
        raise FactoryError(f"The imported model carries tuner {getattr(model, 'applied_tuner', None)!r}; only an "
                           "imported MoReS can be written as tuner files beside an HF Llava export.")
    mores.detach()
    model.batch_observers.remove(mores)
    del model.llm.mores
    model.applied_tuner = None
    return model


def export(checkpoint: str, out: str, overwrite: bool = False, trust_remote_code: bool = False) -> Dict[str, Any]:
    """Export `checkpoint` (a `<run_dir>/<stage>` folder, or `hf:<dir>`) into the new folder `out`."""
    out_path = Path(out).expanduser()
    imported = ckpt.imported_source(checkpoint) is not None
    meta = {} if imported else ckpt.read_meta(Path(checkpoint).expanduser())
    model = ckpt.load_checkpoint(checkpoint, trust_remote_code=trust_remote_code)
    # an imported folder has no meta.json: its importer records the tuner it attached (tinyllava: LLaVA-Steering's MoReS)
    tuner = getattr(model, "applied_tuner", None) if imported else meta.get("tuner")
    if imported and tuner in ATTACHABLE:
        meta = {"tuner": tuner}
    tmp = prepare_out(out_path, overwrite)
    try:
        tuner_files = [p.name for p in write_tuner_files(model, meta, tmp)] if tuner in ATTACHABLE else None
        if imported:
            base = without_mores(model) if tuner in ATTACHABLE else model
        else:
            base = base_without_tuner(Path(checkpoint).expanduser(), meta) if tuner in ATTACHABLE else model
        report = write_hf_llava(base, tmp)
        if tuner_files is not None:
            report["tuner_files"] = tuner_files
        if out_path.exists():  # overwrite=true, checked in prepare_out
            shutil.rmtree(out_path)
        tmp.rename(out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out_path), "checkpoint": str(checkpoint), "tuner": tuner, **report,
            "note": PROCESSOR_NOTE}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        result = export(**parse_args(argv))
    except FactoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
