"""The paper's comparison in miniature: every tuner trained for stage 2 from ONE shared stage-1 checkpoint.

    python scripts/microworld_comparison.py [--out runs/microworld_comparison] [--seeds 0 1 2] \
        [--tuners full lora lora_r8 adapter ia3 oft mores_r1 mores_r2 mores_r4] \
        [--ablations rank positions layers rotation modality] [--max-steps N] [--pretrain-steps N] \
        [--eval-limit N] [--retention-questions N] [--imbalance-samples N] [--jobs 2] \
        [--doc docs/results/microworld.md]

1. `train.py stage=pretrain` once (seed of the first --seeds entry) → <out>/stage1/pretrain;
2. per variant × seed: `train.py stage=instruct stage.init_from=<out>/stage1/pretrain tuner=... seed=...`
   (micro-world evaluation switched off there; it is done here, on the loaded checkpoint);
3. per run: trainable LLM parameters (TP*, factory.tuners.tuning_report), held-out accuracy per question type
   (eval.json), POPE per sampling (pope.json), text-only retention against the base LM (the first
   --retention-questions of eval.json read from their caption: factory.eval.microworld_reading), LMAR / visual
   share per layer (factory.eval.imbalance), stage-2 wall time → <out>/<variant>/seed<s>.json;
4. the Markdown tables (mean ± std over seeds), the verdict on each claim of the paper (`verdicts`) and two PNGs
   next to --doc.
Finished runs (train.py's summary.json, the measured JSON) are reused, so an interrupted comparison resumes where it
stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUESTION_TYPES = ("color", "shape", "count", "position", "existence")
# Main table: tuner name → train.py overrides.
# LoRA at the paper's r = 128 (alpha 256), which at the micro-world LMs' width of 128 is full rank, and at the rank
# scaled to this width: 128 · 128 / 2560 (Phi-2's width) = 6.4 → r = 8, alpha 16 (the same alpha / r = 2).
MAIN = {
    "full": ["tuner=full"], "lora": ["tuner=lora"], "lora_r8": ["tuner=lora", "tuner.r=8", "tuner.alpha=16"],
    "adapter": ["tuner=adapter"], "ia3": ["tuner=ia3"], "oft": ["tuner=oft"],
    "mores_r1": ["tuner=mores", "tuner.rank=1"], "mores_r2": ["tuner=mores", "tuner.rank=2"],
    "mores_r4": ["tuner=mores", "tuner.rank=4"],
}


# The main-table runs each ablation is read against (rank 1 = f4+l5 positions on all layers, the defaults).
ABLATION_REFERENCES = {"rank": ["mores_r1", "mores_r2", "mores_r4"], "positions": ["mores_r1"], "layers": ["mores_r1"],
                       "rotation": ["mores_r1"], "modality": ["mores_r1"]}
ABLATIONS = tuple(ABLATION_REFERENCES)


def ablations(num_layers: int) -> Dict[str, Dict[str, List[str]]]:
    """MoReS ablations (rank 1 unless named): rank 8; steered positions (f4+l5 is 9 of the 16 image tokens here,
    56 %: the reference; then 25, 50 and 100 % of them); steered layers; R frozen at its initial value; MoReS on the
    prompt's text tokens instead of the image's."""
    deep = f"'{num_layers // 2}-{num_layers - 1}'"
    return {
        "rank": {"mores_r8": ["tuner=mores", "tuner.rank=8"]},
        "positions": {f"mores_pos_ratio{int(r * 100)}": ["tuner=mores", f"tuner.positions='ratio={r}'"]
                      for r in (0.01, 0.25, 0.5, 1.0)},
        "layers": {"mores_layers_every_2nd": ["tuner=mores", "tuner.layers=every_2nd"],
                   "mores_layers_deep_half": ["tuner=mores", f"tuner.layers={deep}"]},
        "rotation": {"mores_frozen_rotation": ["tuner=mores", "tuner.train_rotation=false"]},
        "modality": {"mores_text": ["tuner=mores", "tuner.modality=text"]},
    }


def train(args, run_dir: Path, overrides: List[str]) -> None:
    """One train.py process; its log goes to <run_dir>.log. Raises with the log's tail when it fails."""
    # overwrite=true: a run without summary.json was interrupted; train.py refuses to reuse its folder otherwise
    cmd = [sys.executable, str(REPO / "train.py"), f"run_dir={run_dir}", "overwrite=true", "logger=none",
           "eval.enabled=false", f"trainer.cpu_threads={args.threads}", *overrides]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.with_suffix(".log")
    with open(log, "w") as fh:
        code = subprocess.call(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    if code != 0:
        tail = log.read_text()[-2000:]
        raise SystemExit(f"train.py failed ({code}) for {run_dir}: {' '.join(cmd)}\n{tail}")


def measure(args, run_dir: Path, variant: str, seed: int) -> dict:
    """Load the stage-2 checkpoint and measure everything the table and the plots need."""
    import torch
    from omegaconf import OmegaConf

    from factory import load_checkpoint
    from factory.eval.after_training import retention
    from factory.eval.generate import load_questions
    from factory.eval.imbalance import analyze
    from factory.eval.microworld import evaluate_microworld
    from factory.tuners import tuning_report

    torch.set_num_threads(args.threads)
    ckpt = run_dir / "instruct"
    cfg = OmegaConf.load(ckpt / "config.yaml")
    data = cfg.data.eval
    eval_json, images = REPO / data.json, REPO / data.image_folder
    model = load_checkpoint(ckpt)
    report = tuning_report(model)
    result = evaluate_microworld(model, eval_json, images, limit=args.eval_limit)
    pope = evaluate_microworld(model, REPO / data.pope_json, images, limit=args.pope_limit)["pope_by_sampling"]
    cfg.data.eval.json = str(eval_json)
    kept = retention(model, cfg, args.retention_questions, 16)
    imbalance = analyze(model, load_questions(eval_json), images, num_samples=args.imbalance_samples,
                        max_new_tokens=8, label=variant, progress=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"variant": variant, "seed": seed, "trainable_llm": report["trainable_llm"],
            "trainable_total": report["trainable_total"], "accuracy": result["accuracy"],
            "per_type": result["per_type"], "n": result["n"],
            "pope": {s: {k: m[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio", "n")}
                     for s, m in pope.items()},
            "retention": kept["retention"], "reading": kept["reading"],
            "train_wall_s": summary["stages"]["instruct"]["wall_s"], "steps": summary["stages"]["instruct"]["steps"],
            "lmar": imbalance["lmar"], "visual_share": imbalance["visual_share"]}


def _ms(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


POPE_SAMPLINGS = ("random", "popular", "adversarial")


def table(rows_by_variant: Dict[str, List[dict]]) -> str:
    head = ("| tuner | TP* | seeds | accuracy | " + " | ".join(QUESTION_TYPES)
            + " | POPE F1 rand / pop / adv | POPE acc adv | yes % adv | retention % | LMAR (mean of layers) "
            + "| stage-2 wall s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for variant, rows in rows_by_variant.items():
        cells = [variant, f"{rows[0]['trainable_llm']:,}", str(len(rows)), _ms([r["accuracy"] for r in rows])]
        cells += [_ms([r["per_type"].get(t) for r in rows]) for t in QUESTION_TYPES]
        cells.append(" / ".join(_ms([r["pope"][s]["f1"] for r in rows]) for s in POPE_SAMPLINGS))
        cells += [_ms([r["pope"]["adversarial"][k] for r in rows]) for k in ("accuracy", "yes_ratio")]
        cells += [_ms([r["retention"] for r in rows]), _ms([statistics.mean(r["lmar"]) for r in rows]),
                  _ms([r["train_wall_s"] for r in rows])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lmar_table(rows_by_variant: Dict[str, List[dict]]) -> str:
    """LMAR per layer (mean over seeds): the share of the answer's attention on image tokens relative to text."""
    layers = len(next(iter(rows_by_variant.values()))[0]["lmar"])
    head = "| tuner | " + " | ".join(f"layer {i}" for i in range(layers)) + " |"
    lines = [head, "|" + "---|" * (layers + 1)]
    for variant, rows in rows_by_variant.items():
        lines.append(f"| {variant} | " + " | ".join(f"{v:.3f}" for v in mean_layers(rows, "lmar")) + " |")
    return "\n".join(lines)


def plot_accuracy_vs_params(rows_by_variant: Dict[str, List[dict]], out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for variant, rows in rows_by_variant.items():
        accs = [r["accuracy"] for r in rows]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ax.errorbar([max(rows[0]["trainable_llm"], 1)], [statistics.mean(accs)], yerr=[std], fmt="o", capsize=3,
                    label=variant)
    ax.set_xscale("log")
    ax.set_xlabel("trainable LLM parameters (log scale)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Micro-world: accuracy vs trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def mean_layers(rows: List[dict], key: str) -> List[float]:
    return [statistics.mean(vals) for vals in zip(*[r[key] for r in rows])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "microworld_comparison")
    parser.add_argument("--tuners", nargs="+", default=list(MAIN), choices=list(MAIN))
    parser.add_argument("--ablations", nargs="*", default=[], choices=list(ABLATIONS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=None, help="stage-2 steps (default: trainer config)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="stage-1 steps (default: trainer config)")
    parser.add_argument("--eval-limit", type=int, default=None, help="first N held-out questions (default: all)")
    parser.add_argument("--pope-limit", type=int, default=None, help="first N POPE rows (default: all)")
    parser.add_argument("--retention-questions", type=int, default=250,
                        help="eval.json rows asked again text-only for the retention figure")
    parser.add_argument("--imbalance-samples", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=1, help="stage-2 trainings run in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--doc", type=Path, default=None, help="Markdown results file (PNGs go next to it)")
    parser.add_argument("--extra", nargs="*", default=[], help="more train.py overrides for every run")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    started = time.time()

    from transformers import AutoConfig
    num_layers = AutoConfig.from_pretrained(REPO / "factory" / "assets" / "microworld" / "phi").num_hidden_layers
    variants = {name: MAIN[name] for name in args.tuners}
    groups = {group: ablations(num_layers)[group] for group in args.ablations}
    for group_variants in groups.values():
        variants.update(group_variants)

    stage1 = out / "stage1"
    if not (stage1 / "pretrain" / "meta.json").exists():
        steps = [f"trainer.max_steps={args.pretrain_steps}"] if args.pretrain_steps else []
        train(args, stage1, ["stage=pretrain", f"seed={args.seeds[0]}", *steps, *args.extra])
    common = ["stage=instruct", f"stage.init_from={stage1 / 'pretrain'}", *args.extra]
    if args.max_steps:
        common.append(f"trainer.max_steps={args.max_steps}")

    # A run is done once train.py wrote its summary; measuring it is the cheap part.
    jobs = [(v, s) for v in variants for s in args.seeds if not (out / v / f"seed{s}" / "summary.json").exists()]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # processes, so threads are enough here
        list(pool.map(lambda job: train(args, out / job[0] / f"seed{job[1]}",
                                        common + variants[job[0]] + [f"seed={job[1]}"]), jobs))
    rows_by_variant: Dict[str, List[dict]] = {}
    for variant in variants:
        for seed in args.seeds:
            path = out / variant / f"seed{seed}.json"
            if not path.exists():
                path.write_text(json.dumps(measure(args, out / variant / f"seed{seed}", variant, seed)) + "\n")
            rows_by_variant.setdefault(variant, []).append(json.loads(path.read_text()))

    doc = args.doc or out / "microworld.md"
    from factory.eval.plots import plot_imbalance
    # The plots show the main table; the ablations are tables of their own, each next to its MoReS references.
    main_rows = {v: rows_by_variant[v] for v in args.tuners}
    acc_png = plot_accuracy_vs_params(main_rows, doc.parent / "microworld_accuracy_vs_params.png")
    imb_png = plot_imbalance([{"label": v, "lmar": mean_layers(rows, "lmar"),
                               "visual_share": mean_layers(rows, "visual_share")}
                              for v, rows in main_rows.items()],
                             doc.parent / "microworld_imbalance.png", title="Micro-world, held-out questions")
    text = table(main_rows)
    for group, group_variants in groups.items():
        references = [v for v in ABLATION_REFERENCES[group] if v in rows_by_variant]
        text += (f"\n\n**Ablation: {group}** (MoReS rank 1, f4+l5, all layers unless named)\n\n"
                 + table({v: rows_by_variant[v] for v in [*references, *group_variants]}))
    text += "\n\n**LMAR per layer** (mean over seeds)\n\n" + lmar_table(rows_by_variant)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # microworld_verdicts.py sits beside this script
    from microworld_verdicts import verdicts

    text += "\n\n## Verdict\n\n" + "\n".join(verdicts(rows_by_variant, list(args.tuners)))
    (out / "table.md").write_text(text + "\n")
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(
        "# Micro-world comparison (generated by scripts/microworld_comparison.py)\n\n"
        f"Command: `python scripts/microworld_comparison.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
        f"\n\nStage 1 once (seed {args.seeds[0]}), stage 2 per tuner × seed from it; held-out questions: "
        f"{rows_by_variant[next(iter(rows_by_variant))][0]['n']}; accuracy in %, mean ± std over seeds; wall time "
        f"of stage-2 training only ({args.jobs} run(s) in parallel, {args.threads} thread(s) each).\n\n"
        + text + f"\n\n![accuracy vs trainable parameters]({acc_png.name})\n\n"
        f"![LMAR and visual share per layer]({imb_png.name})\n")
    result = {"doc": str(doc), "table": str(out / "table.md"), "plots": [str(acc_png), str(imb_png)],
              "wall_s": round(time.time() - started, 1), "runs": sum(map(len, rows_by_variant.values()))}
    print(text)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
