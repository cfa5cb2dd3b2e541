"""Config validation in one place (factory/config_checks.py), before any work: types, ranges and unknown keys, each
with a message naming the key, the value and what is accepted; keys added to a group's YAML are known by themselves."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from dist_helpers import REPO, child_env
from factory.config import CONFIG_DIR, compose
from factory.config_checks import check_config, config_problems
from factory.errors import FactoryError


def problems(*overrides):
    return config_problems(compose(list(overrides)))


def test_the_shipped_configs_pass():
    assert problems() == []
    for overrides in (["tuner=lora"], ["tuner=mores_h"], ["tuner=oft"], ["tuner=adapter"], ["tuner=ia3"],
                      ["experiment=llava_3b_paper"], ["stage=instruct"], ["trainer=paper", "data=llava_v15"]):
        assert problems(*overrides) == [], overrides


@pytest.mark.parametrize("override, message", [
    ("trainer.pretrain.lr=abc", "`trainer.pretrain.lr` must be a number > 0, got 'abc' (str)."),
    ("trainer.pretrain.lr=-1", "`trainer.pretrain.lr` must be a number > 0, got -1 (int)."),
    ("trainer.pretrain.lr=nan", "`trainer.pretrain.lr` must be a number > 0, got nan (float)."),
    ("trainer.max_steps=abc", "`trainer.max_steps` must be an integer >= 1 (or null), got 'abc' (str)."),
    ("trainer.max_steps=-1", "`trainer.max_steps` must be an integer >= 1 (or null), got -1 (int)."),
    ("trainer.max_steps=0", "`trainer.max_steps` must be an integer >= 1 (or null), got 0 (int)."),
    ("seed=abc", "`seed` must be an integer >= 0, got 'abc' (str)."),
    ("tuner.rank=abc", "tuner.rank='abc' is not valid for the 'mores' tuner: it must be an integer."),
    ("tuner.dropout=1.5", "tuner.dropout=1.5 is not valid for the 'mores' tuner: it must be >= 0 and < 1."),
    ("trainer.instruct.warmup_ratio=inf", "`trainer.instruct.warmup_ratio` must be a number >= 0 and < 1, got inf"),
    ("trainer.precision=fp64", "`trainer.precision` must be one of auto, fp32, bf16, got 'fp64' (str)."),
    ("resume=yes", "`resume` must be true or false, got 'yes' (str)."),
    ("data.sizes.num_train_images=0", "`data.sizes.num_train_images` must be an integer >= 1, got 0 (int)."),
    ("data.on_bad_sample=ignore", "`data.on_bad_sample` must be one of error, skip, got 'ignore' (str)."),
    ("data.max_bad_fraction=2", "`data.max_bad_fraction` must be a number >= 0 and <= 1, got 2 (int)."),
])
def test_bad_values_are_named_with_what_is_accepted(override, message):
    found = problems(override)
    assert len(found) == 1 and found[0].startswith(message), found


def test_bad_data_options_on_bad_sample_and_max_aspect_ratio():
    """data.on_bad_sample is error | skip; data.max_aspect_ratio is a number >= 1, or null to turn the limit off."""
    assert problems("data.on_bad_sample=skip") == [] and problems("data.on_bad_sample=error") == []
    assert problems("data.max_aspect_ratio=null") == [] and problems("data.max_aspect_ratio=1") == []
    for override, message in [
        ("data.on_bad_sample=maybe", "`data.on_bad_sample` must be one of error, skip, got 'maybe' (str)."),
        ("data.max_aspect_ratio=0.5", "`data.max_aspect_ratio` must be a number >= 1 (or null), got 0.5 (float)."),
        ("data.max_aspect_ratio=abc", "`data.max_aspect_ratio` must be a number >= 1 (or null), got 'abc' (str)."),
    ]:
        found = problems(override)
        assert len(found) == 1 and found[0].startswith(message), (override, found)


def test_a_key_nothing_reads_is_an_error_with_the_keys_nearby():
    found = problems("+trainer.lr=0.5")
    assert len(found) == 1
    assert found[0].startswith("`trainer.lr` is not a setting of trainer (nothing reads it, it would be silently "
                               "ignored); did you mean trainer.instruct.lr or trainer.pretrain.lr? Known keys: ")
    assert "pretrain.lr" in found[0] and "save_every" in found[0]
    # a tuner's keys are those of the selected tuner: MoReS' rank means nothing to LoRA
    lora = problems("tuner=lora", "+tuner.rank=4")
    assert len(lora) == 1 and lora[0].startswith("`tuner.rank` is not a setting of tuner 'lora'")
    assert "alpha, dropout, name, r, target_modules" in lora[0]
    assert problems("+seeed=1")[0].startswith("`seeed` is not a setting (nothing reads it, it would be silently "
                                              "ignored); did you mean seed?")
    assert problems("+data.sizes.num_train_imgs=5")[0].startswith(
        "`data.sizes.num_train_imgs` is not a setting of data 'microworld'")


def test_all_problems_in_one_error():
    cfg = compose(["trainer.pretrain.lr=abc", "seed=abc", "+trainer.lr=0.5"])
    with pytest.raises(FactoryError) as err:
        check_config(cfg)
    text = str(err.value)
    assert text.startswith("The config has 3 problems; nothing was run:\n  - ")
    assert "`trainer.lr`" in text and "`seed`" in text and "`trainer.pretrain.lr`" in text


def test_keys_added_to_a_groups_yaml_are_known_without_code(tmp_path):
    """Known keys come from the YAML files: a key another component adds to configs/data/*.yaml is accepted."""
    config_dir = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, config_dir)
    cfg = compose(["+data.new_policy=skip", "+trainer.new_knob=3"])
    assert len(config_problems(cfg, config_dir=config_dir)) == 2
    with (config_dir / "data" / "microworld.yaml").open("a") as handle:
        handle.write("new_policy: error\n")
    with (config_dir / "trainer" / "paper.yaml").open("a") as handle:  # another option of the group also counts
        handle.write("new_knob: 1\n")
    assert config_problems(cfg, config_dir=config_dir) == []


def test_train_py_validates_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), f"run_dir={tmp_path / 'run'}", "logger=none",
                           "trainer.max_steps=-1", "+trainer.lr=0.5"], env=child_env(), cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Error: The config has 2 problems; nothing was run:" in proc.stderr
    assert "`trainer.max_steps` must be an integer >= 1 (or null), got -1 (int)." in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "data").exists()


def test_usable_by_other_entry_points_with_their_own_root_file_and_rules():
    """eval.py's settings (configs/eval.yaml) checked with the same machinery and a table of its own."""
    from omegaconf import OmegaConf

    from factory.config_checks import _number

    base = OmegaConf.load(CONFIG_DIR / "eval.yaml")
    for composition_only in ("defaults", "hydra"):  # what Hydra consumes while composing
        del base[composition_only]
    cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(["checkpoint=runs/a/instruct", "batch_size=abc", "bench=pope"]))
    found = config_problems(cfg, groups=(), root_file="eval.yaml",
                            rules={"batch_size": _number(lo=1, integer=True)})
    assert found[0].startswith("`bench` is not a setting (nothing reads it, it would be silently ignored); did you "
                               "mean benchmark?")
    assert found[1] == "`batch_size` must be an integer >= 1, got 'abc' (str)."


def test_eval_py_settings_are_checked_before_the_model_is_loaded():
    from factory.eval.cli import load_config

    assert load_config(["checkpoint=runs/a/instruct", "batch_size=4", "dtype=bf16"]).batch_size == 4
    with pytest.raises(FactoryError) as err:
        load_config(["checkpoint=runs/a/instruct", "batch_size=0", "limit=abc", "imbalance.num_samples=-5"])
    text = str(err.value)
    assert text.startswith("The config has 3 problems; nothing was run:")
    assert "`batch_size` must be an integer >= 1, got 0 (int)." in text
    assert "`limit` must be an integer >= 1 (or null), got 'abc' (str)." in text
    assert "`imbalance.num_samples` must be an integer >= 1, got -5 (int)." in text


def test_tuner_option_errors_are_listed_with_the_other_problems():
    """Tuner values are checked by the tuner's typed options (one place), in the same one-message list as the rest."""
    found = problems("tuner.rank=abc", "seed=abc")
    assert len(found) == 2, found
    assert any(p.startswith("`seed` must be an integer") for p in found)
    assert any(p.startswith("tuner.rank='abc' is not valid for the 'mores' tuner") for p in found)
