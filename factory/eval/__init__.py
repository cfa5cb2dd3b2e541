"""Evaluation: batched greedy generation, benchmark scorers (official rules), the micro-world benchmark and the
modality-imbalance analysis (LMAR). Submodules are imported on use so that scoring works without torch models."""
