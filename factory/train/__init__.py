"""Two-stage training on a DeepSpeed engine: `factory.train.recipe.run(cfg)` is the recipe behind `python train.py`
(see recipe.py for the run, loop.py for one stage). Checkpoints are read with `factory.load_checkpoint`
(factory/checkpoint.py, the layer below train and eval).

Its `run` imports the recipe when called, so that `python train.py --cfg job` (which imports train/hydra_folders.py)
stays cheap."""


def run(cfg):
    """Run the stages of `cfg.stage.run`, save `<run_dir>/<stage>/` checkpoints, evaluate; returns a summary."""
    from factory.train.recipe import run as _run  # torch + deepspeed: `import factory.train` stays cheap

    return _run(cfg)


__all__ = ["run"]
