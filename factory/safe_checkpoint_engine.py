"""DeepSpeed's checkpoint engine with safe reading: the engine's resume state (model, optimizer and scheduler
states under `<stage>/deepspeed/`) is loaded with ``torch.load(weights_only=True)`` plus DeepSpeed's own record
classes (factory.safe_load), so a crafted file in a run folder is refused instead of executed.

DeepSpeed reads every file of `engine.load_checkpoint` through `engine.checkpoint_engine`, an attribute of the
engine instance; `create_engine` installs this subclass there. Writing is DeepSpeed's own, unchanged.
"""
from __future__ import annotations

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from factory.safe_load import deepspeed_state_globals, load_torch_file


class SafeTorchCheckpointEngine(TorchCheckpointEngine):
    def load(self, path: str, map_location=None):
        return load_torch_file(path, deepspeed_state_globals(), map_location=map_location)


def install_safe_checkpoint_engine(engine) -> bool:
    """Replace DeepSpeed's default torch engine by the safe one; returns False when the DeepSpeed config selected
    another engine (a writer / datastates config), which `load_engine_state` then refuses to read from."""
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        return False
    engine.checkpoint_engine = SafeTorchCheckpointEngine(engine._config)
    return True
