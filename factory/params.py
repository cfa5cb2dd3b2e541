"""Parameter report: trainable parameters per component for a model preset and tuner, on the meta device.

    python -m factory.params model=llava_3b tuner=mores [tuner.rank=2 ...]
        → the last stdout line is one JSON object:
          {"model", "tuner", "trainable_llm", "trainable_connector", "trainable_vision", "trainable_total", "total"}
    python -m factory.params --table
        → markdown table of every tuner × llava_3b/7b/13b next to the paper's TP*; also written to docs/params.md

The model is composed exactly as `train.py` would (factory.config.compose), built with init=meta (no weights, no
memory: seconds even for 13B), and tuned as in the instruct stage (stage.instruct.tune). `trainable_llm` is TP*.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

if __name__ == "__main__":
    # Counting needs no weights and no tokenizer from the hub: never wait on the network. huggingface_hub reads these
    # once, when it is first imported (below, through factory.model.build), so they are set before any import.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from omegaconf import OmegaConf

from factory.config import CONFIG_DIR, compose
from factory.errors import FactoryError
from factory.model.build import build_model
from factory.stages import tune_for_stage
from factory.tuners import apply_tuning

MODELS = ("llava_3b", "llava_7b", "llava_13b")


def tuner_configs(config_dir: Path = CONFIG_DIR) -> Tuple[str, ...]:
    """The tuner presets shipped in configs/tuner/*.yaml (package data), sorted by name: a new preset file is
    counted in the table (and so must appear in docs/params.md) without editing this module."""
    return tuple(sorted(path.stem for path in (Path(config_dir) / "tuner").glob("*.yaml")))


TUNER_CONFIGS = tuner_configs()

# The paper's TP* (PAPER.md §2), LLM parameters only. None = not published.
PAPER_TP: Dict[str, Dict[str, Optional[int]]] = {
    "mores": {"llava_3b": 163_872, "llava_7b": 262_176, "llava_13b": 409_640},
    "mores_l": {"llava_3b": 327_744, "llava_7b": None, "llava_13b": None},
    "mores_h": {"llava_3b": 655_488, "llava_7b": None, "llava_13b": None},
    "lora": {"llava_3b": 188_743_680, "llava_7b": 319_815_680, "llava_13b": 500_695_040},
    # QLoRA: no TP* is published; by the paper's convention (trainable LLM parameters only) it is its LoRA
    # weights, LoRA's count above, which tests/test_params.py checks.
    "qlora": {"llava_3b": None, "llava_7b": None, "llava_13b": None},
    "ia3": {"llava_3b": 491_520, "llava_7b": 614_400, "llava_13b": 962_560},
    "adapter": {"llava_3b": 83_886_080, "llava_7b": 201_326_592, "llava_13b": 314_572_800},
    "oft": {"llava_3b": 39_321_600, "llava_7b": 100_663_296, "llava_13b": 196_608_000},
    "full": {"llava_3b": 2_780_000_000, "llava_7b": None, "llava_13b": None},  # published as "2.78B"
    "frozen": {"llava_3b": 0, "llava_7b": 0, "llava_13b": 0},
}

DOCS_PATH = Path(__file__).resolve().parent.parent / "docs" / "params.md"


def _choice(overrides: Sequence[str], group: str) -> Optional[str]:
    for item in overrides:
        if item.startswith(f"{group}="):
            return item.split("=", 1)[1]
    return None


def count(overrides: Sequence[str]) -> Dict[str, Any]:
    """Compose with the overrides, build on meta, apply the instruct-stage tuning, return the report dict."""
    overrides = [o for o in overrides if not o.startswith("init=")] + ["init=meta"]
    cfg = compose(overrides)
    model = build_model(cfg)
    report = apply_tuning(model, cfg.tuner, tune=tune_for_stage(cfg, "instruct"))
    result = {
        "model": OmegaConf.select(cfg, "model.name", default=None) or _choice(overrides, "model"),
        "tuner": _choice(overrides, "tuner") or str(cfg.tuner.name),
        **{k: report[k] for k in ("trainable_llm", "trainable_connector", "trainable_vision", "trainable_total",
                                  "total")},
    }
    if hasattr(model.llm, "get_nb_trainable_parameters"):  # PEFT's own count, for comparison
        result["peft_trainable"] = int(model.llm.get_nb_trainable_parameters()[0])
    return result


def _fmt(value: Optional[int]) -> str:
    return "–" if value is None else f"{value:,}"


def table() -> str:
    rows: List[str] = [
        "| tuner | " + " | ".join(f"{m} TP* (ours) | {m} paper" for m in MODELS) + " |",
        "|---|" + "---:|---:|" * len(MODELS),
    ]
    results: Dict[tuple, Dict[str, Any]] = {}
    for tuner in TUNER_CONFIGS:
        cells = []
        for model in MODELS:
            result = results[tuner, model] = count([f"model={model}", f"tuner={tuner}"])
            ours, paper = result["trainable_llm"], PAPER_TP.get(tuner, {}).get(model)
            # OFT differs by design (peft storage, see notes); "full" is published rounded to 2.78B
            mark = "" if paper is None or ours == paper or tuner in ("oft", "full") else " ≠"
            cells.append(f"{_fmt(ours)}{mark} | {'2.78B' if tuner == 'full' and paper else _fmt(paper)}")
        rows.append(f"| {tuner} | " + " | ".join(cells) + " |")
    rows.append("")
    rows.append("Connector (trained in stage 2 with every tuner): " + ", ".join(
        f"{m} {_fmt(results['frozen', m]['trainable_connector'])}" for m in MODELS) + ".")
    rows.append("Whole model (vision + connector + LLM, no tuner weights): " + ", ".join(
        f"{m} {_fmt(results['frozen', m]['total'])}" for m in MODELS) + ".")
    return "\n".join(rows)


_DOC_HEAD = """# Trainable parameters per tuner (TP*)

Generated by `python -m factory.params --table` (meta device, instruct-stage tuning: vision frozen, connector
trained, LLM per tuner). TP* counts only parameters inside the LLM, as the paper does; the connector is trained with
every tuner and listed below the table. "≠" would mark a count that differs from the paper.

"""

_DOC_TAIL = """

Notes
- MoReS: d(2D+1) per steered layer (R: D×d householder reflectors, W: d×D, b: d); mores_l d=2, mores_h d=4.
- LoRA r=128, α=256 on every linear of the LLM (attention q/k/v/out, all MLP projections; not lm_head).
- QLoRA: the same LoRA on a frozen 4-bit NF4 base (bitsandbytes Linear4bit in every decoder-layer linear).
  The paper publishes no QLoRA TP*; by its convention (trainable LLM parameters only) TP* is the LoRA weights,
  which quantization does not change, so the count equals LoRA's (on the meta device nothing is quantized).
- IA3 on k, v and the FFN down projection (fc2 / down_proj, scaled on its FFN-wide input).
- Adapter: bottleneck 256, series, on the hidden-size side of each MLP projection (Phi 2, Llama 3 per layer).
- OFT (q, k, v, 16 blocks): the paper's numbers are 3·D²/16 per layer, peft 0.10's storage of every block as a dense
  b×b matrix (b = D/16). peft ≥ 0.16 (used here) stores only the b(b−1)/2 free entries of each skew-symmetric block
  (the Cayley transform of a skew-symmetric S is the orthogonal block), so the same OFT has 3·16·b(b−1)/2 parameters
  per layer: for Phi-2 (b=160) 32·3·16·12,720 = 19,537,920. Both describe the same set of block-diagonal rotations.
- full: every LLM parameter (Phi-2 2,779,683,840; the paper rounds to 2.78B).
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if "--table" in args:
            text = table()
            print(text)
            if DOCS_PATH.parent.is_dir():  # a clone; an installed package has no docs/ folder to update
                DOCS_PATH.write_text(_DOC_HEAD + text + _DOC_TAIL)
                print(f"(written to {DOCS_PATH.name} in docs/)")
            return 0
        print(json.dumps(count(args)))
        return 0
    except FactoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
