"""Figures of the modality-imbalance analysis (the paper's Figures 1–2): LMAR per layer on a log axis and the share
of attention mass on visual tokens per layer, several checkpoints / tuners overlaid with a legend.

    python -m factory.eval.plots runs/full/imbalance.json runs/mores/imbalance.json --out imbalance.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from factory.errors import FactoryError

Result = Union[Dict[str, Any], str, Path]


def _load(result: Result) -> Dict[str, Any]:
    if isinstance(result, dict):
        data = result
    else:
        path = Path(result)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise FactoryError(f"Cannot read the imbalance results {path} ({err}); pass JSON files written by the "
                               f"imbalance analysis.") from None
        data.setdefault("label", path.parent.name or path.stem)
    for key in ("lmar", "visual_share"):
        if not isinstance(data.get(key), list) or not data[key]:
            raise FactoryError(f"Imbalance results {data.get('label', result)!r} lack the per-layer list `{key}`; "
                               f"pass JSON files written by factory.eval.imbalance.")
    return data


def plot_imbalance(results: Sequence[Result], out_png: Union[str, Path], labels: Optional[Sequence[str]] = None,
                   title: Optional[str] = None) -> Path:
    """One PNG with two panels (LMAR per layer, log scale; visual share per layer in %), one line per result."""
    import matplotlib  # optional and slow to import: only the imbalance plot needs it

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt  # after use("Agg"), which must come first

    data: List[Dict[str, Any]] = [_load(r) for r in results]
    if not data:
        raise FactoryError("plot_imbalance needs at least one imbalance result.")
    if labels is not None and len(labels) != len(data):
        raise FactoryError(f"{len(labels)} labels given for {len(data)} results; give one label per result.")
    fig, (ax_lmar, ax_share) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, result in enumerate(data):
        label = labels[i] if labels is not None else str(result.get("label", f"run {i}"))
        layers = list(range(len(result["lmar"])))
        lmar = [max(float(v), 1e-6) for v in result["lmar"]]  # log axis: keep zero ratios drawable
        ax_lmar.plot(layers, lmar, marker="o", markersize=3, label=label)
        ax_share.plot(layers, [100.0 * float(v) for v in result["visual_share"]], marker="o", markersize=3,
                      label=label)
    ax_lmar.set_yscale("log")
    ax_lmar.axhline(1.0, color="grey", linestyle="--", linewidth=1)  # LMAR = 1: a visual token weighs a text token
    ax_lmar.set_xlabel("layer")
    ax_lmar.set_ylabel("LMAR (α_image / α_text, log scale)")
    ax_lmar.set_title("Layer-wise modality attention ratio")
    ax_share.set_xlabel("layer")
    ax_share.set_ylabel("attention mass on visual tokens (%)")
    ax_share.set_title("Visual share of attention")
    from matplotlib.ticker import MaxNLocator  # matplotlib: see above

    for ax in (ax_lmar, ax_share):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m factory.eval.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="imbalance JSON files (one line each in the plot)")
    parser.add_argument("--out", type=Path, required=True, help="output PNG")
    parser.add_argument("--labels", nargs="*", help="legend labels (default: each result's label)")
    parser.add_argument("--title")
    args = parser.parse_args(argv)
    try:
        print(plot_imbalance(args.results, args.out, args.labels, args.title))
    except FactoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
