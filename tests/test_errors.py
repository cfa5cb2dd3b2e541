"""User errors end in one FactoryError message naming the file / sample / key (train.py: exit code 2, no trace)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from factory.errors import FactoryError
from train_support import REPO, make_small_world, train_cfg


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_small_world(tmp_path_factory.mktemp("world"))


def _run(cfg):
    from factory.train import run

    return run(cfg)


def _pretrain_with(tmp_path, world, entries=None, text=None):
    """A stage-1 config whose data file holds `entries` (or raw `text`); images from the small world."""
    data = tmp_path / "pretrain.json"
    data.write_text(text if text is not None else json.dumps(entries))
    return train_cfg(tmp_path / "run", world, stage="pretrain",
                     **{"data.pretrain.json": str(data), "trainer.max_steps": 1})


def _caption(sample_id, image="train_00000.png", human="<image>\nDescribe the image."):
    return {"id": sample_id, "image": image,
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "A red circle."}]}


def test_malformed_json(tmp_path, world):
    cfg = _pretrain_with(tmp_path, world, text='[{"id": "a", "conversations": [}]')
    with pytest.raises(FactoryError, match=r"pretrain\.json"):
        _run(cfg)


def test_missing_image_names_path_and_sample(tmp_path, world):
    cfg = _pretrain_with(tmp_path, world, [_caption("s1", image="no_such.png")] * 8)
    with pytest.raises(FactoryError, match=r"(?s)(no_such\.png.*s1|s1.*no_such\.png)"):
        _run(cfg)


@pytest.mark.parametrize("human", ["Describe the image.", "<image>\n<image>\nDescribe the image."])
def test_image_marker_missing_or_duplicated(tmp_path, world, human):
    cfg = _pretrain_with(tmp_path, world, [_caption("bad-marker", human=human)] + [_caption(f"ok{i}") for i in range(7)])
    with pytest.raises(FactoryError, match=r"(?s)bad-marker.*<image>|<image>.*bad-marker"):
        _run(cfg)


def test_empty_dataset(tmp_path, world):
    cfg = _pretrain_with(tmp_path, world, [])
    with pytest.raises(FactoryError, match=r"(?i)pretrain\.json.*(no usable samples|empty)|empty.*pretrain\.json"):
        _run(cfg)


def test_unknown_component_name(tmp_path, world):
    cfg = train_cfg(tmp_path / "run", world, stage="pretrain", **{"connector.name": "mlp_with_typo"})
    with pytest.raises(FactoryError, match=r"Unknown connector 'mlp_with_typo'.*mlp2x_gelu"):
        _run(cfg)


def test_global_batch_not_divisible(tmp_path, world):
    cfg = train_cfg(tmp_path / "run", world, stage="pretrain", **{"trainer.pretrain.global_batch_size": 6})
    with pytest.raises(FactoryError, match=r"trainer\.pretrain\.global_batch_size"):
        _run(cfg)


def test_stage2_needs_a_stage1_checkpoint(tmp_path, world):
    cfg = train_cfg(tmp_path / "run", world, stage="instruct")
    with pytest.raises(FactoryError, match=r"stage\.init_from"):
        _run(cfg)


# ------------------------------------------------------------------------------------------ through train.py
def _train_py(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                              "MASTER_ADDR", "MASTER_PORT")}
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


@pytest.mark.parametrize("override, names", [("trainer=nope", "trainer/nope"), ("trainer.nope=1", "trainer.nope"),
                                             ("tuner=loraa", "tuner/loraa")])
def test_bad_override_exits_2_without_trace(override, names):
    result = _train_py(override)
    assert result.returncode == 2, result.stderr
    assert names in result.stderr and "Traceback" not in result.stderr


def test_stage2_on_a_non_checkpoint_folder_exits_2(tmp_path):
    not_a_checkpoint = tmp_path / "some_folder"
    not_a_checkpoint.mkdir()
    result = _train_py("stage=instruct", f"stage.init_from={not_a_checkpoint}", "data=llava_v15", "logger=none",
                       f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert message and str(not_a_checkpoint) in message[0] and "not a factory checkpoint" in message[0]
