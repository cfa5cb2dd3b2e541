"""Stage checkpoints: save → load_checkpoint gives identical logits; atomic writes; clear errors for bad folders."""
import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf

import factory
from factory.errors import FactoryError
from factory import checkpoint as ckpt
from train_support import train_cfg


class _PlainEngine:
    """What save_stage_checkpoint needs from a DeepSpeed engine when no resume state is written."""

    def __init__(self, module):
        self.module = module

    def zero_optimization_stage(self):
        return 0


def _batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, 500, (2, 24), generator=generator)
    input_ids[:, 2:18] = -200  # one image of 16 tokens per sample
    return input_ids, torch.ones_like(input_ids), torch.randn(2, 3, 32, 32, generator=generator)


def _save(model, cfg, folder, stage="instruct", template="phi"):
    meta = {"stage": stage, "template": template, "tune": {}, "seed": int(cfg.seed), "complete": True,
            "step": 1, "total_steps": 1}
    return ckpt.save_stage_checkpoint(_PlainEngine(model), cfg, folder, meta, rank=0, with_engine_state=False)


@pytest.fixture()
def trained(tmp_path):
    """A stage-2 model with the MoReS tuner whose trainable weights were moved away from their init."""
    from factory.train.recipe import build_stage_model
    from factory.stages import plan_stages

    cfg = train_cfg(tmp_path / "run", tmp_path / "unused", tuner="mores", stage="all")
    model = build_stage_model(cfg, plan_stages(cfg)[1], None, torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    folder = _save(model, cfg, tmp_path / "run" / "instruct")
    return model.eval(), cfg, folder


def test_load_checkpoint_gives_identical_logits(trained):
    model, _, folder = trained
    loaded = factory.load_checkpoint(folder)
    input_ids, mask, pixels = _batch()
    with torch.no_grad():
        expected = model(input_ids, mask, pixels).logits
        got = loaded(input_ids, mask, pixels).logits
    assert torch.equal(expected, got)
    assert loaded.template == "phi"
    assert set(loaded.trainable_state_dict()) == set(model.trainable_state_dict())
    assert any("mores" in name for name in loaded.trainable_state_dict())  # the tuner was re-attached


def test_only_trainable_weights_are_saved(trained):
    model, _, folder = trained
    saved = ckpt.load_weights_file(folder)
    assert set(saved) == set(model.trainable_state_dict())
    assert sum(t.numel() for t in saved.values()) < sum(p.numel() for p in model.parameters()) / 10


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(FactoryError, match="does not exist"):
        factory.load_checkpoint(tmp_path / "nope")
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(FactoryError, match=r"not a factory checkpoint: config.yaml, trainable.safetensors missing"):
        factory.load_checkpoint(tmp_path)


def test_corrupt_safetensors_names_the_file(trained):
    _, _, folder = trained
    weights = folder / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(FactoryError, match=r"trainable\.safetensors cannot be read.*corrupt"):
        factory.load_checkpoint(folder)


def test_config_mismatch_names_the_file(trained):
    _, cfg, folder = trained
    edited = OmegaConf.load(folder / "config.yaml")
    edited.tuner.rank = 2  # a different MoReS subspace: the saved rotation has the wrong shape
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(edited))
    with pytest.raises(FactoryError, match=r"trainable\.safetensors does not fit the model"):
        factory.load_checkpoint(folder)


def test_stage1_requirement(trained, tmp_path):
    _, _, folder = trained
    with pytest.raises(FactoryError, match=r"stage.init_from.*'instruct' checkpoint.*finished stage-1"):
        ckpt.require_stage1_checkpoint(folder)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps(dict(meta, stage="pretrain", complete=False)))
    with pytest.raises(FactoryError, match="unfinished pretrain checkpoint"):
        ckpt.require_stage1_checkpoint(folder)


def test_failed_save_leaves_previous_checkpoint(trained, monkeypatch):
    model, cfg, folder = trained
    before = (folder / "trainable.safetensors").read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save)  # the writer factory/checkpoint.py calls
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    with pytest.raises(OSError):
        _save(model, cfg, folder)
    assert (folder / "trainable.safetensors").read_bytes() == before
    assert (folder.parent / ".instruct.tmp").exists()  # the half-written attempt, never under the real name
    monkeypatch.undo()
    _save(model, cfg, folder)  # the next save clears the stale attempt
    assert not (folder.parent / ".instruct.tmp").exists()
    assert (folder / "trainable.safetensors").read_bytes() != before


def test_crash_between_renames_is_recovered(trained):
    _, _, folder = trained
    old = folder.with_name(".instruct.old")
    shutil.move(str(folder), str(old))  # the state after the first rename of a save
    ckpt.recover_interrupted_save(folder)
    assert (folder / "meta.json").is_file() and not old.exists()


def test_leftover_old_folder_after_commit_is_harmless(trained):
    model, cfg, folder = trained
    old = folder.with_name(".instruct.old")
    shutil.copytree(folder, old)  # a crash after the commit rename, before the cleanup
    _save(model, cfg, folder)
    assert (folder / "meta.json").is_file() and not old.exists()
    shutil.copytree(folder, old)
    ckpt.recover_interrupted_save(folder)
    assert folder.is_dir() and not old.exists()
