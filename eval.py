"""Evaluate a checkpoint: `python eval.py checkpoint=<dir> benchmark=<name> question_file=... image_folder=...
annotations=...` (settings: configs/eval/benchmark.yaml; logic: factory/eval/cli.py). Add `analysis=imbalance` for
the modality-imbalance analysis. Launch with torchrun to shard the questions over several processes."""
import sys

from factory.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
