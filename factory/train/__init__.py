"""Two-stage training on a DeepSpeed engine (see runner.run for the flow, loop.train_stage for one stage).

Imports are lazy so that `import factory.train` (and `python train.py --cfg job`) stay cheap."""


def run(cfg):
    """Run the stages of `cfg.stage.run`, save `<run_dir>/<stage>/` checkpoints, evaluate; returns a summary."""
    from factory.train.runner import run as _run

    return _run(cfg)


def load_checkpoint(path, device: str = "cpu", dtype=None):
    from factory.train.checkpoint import load_checkpoint as _load

    return _load(path, device=device, dtype=dtype)


__all__ = ["run", "load_checkpoint"]
