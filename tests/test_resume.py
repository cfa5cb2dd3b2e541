"""Exact resume: a `train.py` killed with SIGKILL mid-stage and restarted with `resume=true run_dir=<same>` gives the
bit-identical loss sequence and weights of the run that was never interrupted, and the states a crash DURING a
checkpoint save leaves behind resume just as well.

Stage 2 (instruct) of a tiny random-weight model with the MoReS tuner, its dropout ON (so the RNG state must come
back too), 96 samples in global batches of 8 = 12 steps per epoch, 14 steps: the resumed part crosses the epoch
boundary. Checkpoints every 4 optimizer steps (`trainer.save_every=4`). CPU, fp32, one process, fixed seeds: the
comparison is bitwise (==), no tolerance. A step's loss is a function of exactly the samples of that step, so equal
per-step losses after the resume point also mean no sample was skipped or seen twice.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dist_helpers import (REPO, child_env, launch_command, load_weights, losses, read_metrics, run_checked,
                          shared_world, stage2_overrides)

TUNER, STEPS, SAVE_EVERY = "mores", 14, 4


def overrides(world, run_dir: Path, resume: bool = False):
    extra = [f"trainer.save_every={SAVE_EVERY}"] + (["resume=true"] if resume else [])
    ov = stage2_overrides(world, run_dir, TUNER, max_steps=STEPS, extra=extra)
    return [o for o in ov if o != "tuner.dropout=0"]  # keep the tuner's dropout: the RNG must be restored too


def checkpoint_step(stage_dir: Path) -> int:
    try:
        return int(json.loads((stage_dir / "meta.json").read_text())["step"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def kill_after_checkpoint(world, run_dir: Path, min_step: int, timeout: float = 240) -> int:
    """Start the run, SIGKILL it as soon as a mid-stage checkpoint of at least `min_step` is committed; return the
    checkpoint step it died after."""
    proc = subprocess.Popen(launch_command("python", overrides(world, run_dir)), env=child_env(), cwd=str(REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if checkpoint_step(run_dir / "instruct") >= min_step:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-stage (exit {proc.returncode}):\n{err[-3000:]}"
    step = checkpoint_step(run_dir / "instruct")
    assert min_step <= step < STEPS, step
    return step


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def runs(world, base) -> tuple:
    """(the uninterrupted run, (a run killed right after its step-8 checkpoint, that step)), run side by side (one
    core each). The killed run is left as the crash left it; the tests resume copies of it."""
    uninterrupted, killed = base / "uninterrupted", base / "killed"
    proc = subprocess.Popen(launch_command("python", overrides(world, uninterrupted)), env=child_env(), cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        step = kill_after_checkpoint(world, killed, min_step=2 * SAVE_EVERY)
    finally:
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"the uninterrupted run failed:\n{err[-4000:]}"
    return uninterrupted, (killed, step)


@pytest.fixture(scope="module")
def uninterrupted(runs) -> Path:
    return runs[0]


@pytest.fixture(scope="module")
def killed(runs) -> tuple:
    return runs[1]


def resume_copy(world, killed_dir: Path, target: Path) -> Path:
    shutil.copytree(killed_dir, target)
    run_checked(launch_command("python", overrides(world, target, resume=True)), child_env())
    return target


def assert_identical_to(uninterrupted: Path, resumed: Path) -> None:
    records = read_metrics(resumed, "instruct")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), "every step logged exactly once"
    expected = losses(uninterrupted)
    assert len(expected) == STEPS and expected[-1] != expected[0]
    assert losses(resumed) == expected  # bitwise
    assert [r["lr"] for r in records] == [r["lr"] for r in read_metrics(uninterrupted, "instruct")]
    ref, got = load_weights(uninterrupted / "instruct"), load_weights(resumed / "instruct")
    assert sorted(got) == sorted(ref)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    meta = json.loads((resumed / "instruct" / "meta.json").read_text())
    assert meta["complete"] is True and meta["step"] == STEPS


def test_kill9_then_resume_is_bitwise_identical(world, base, uninterrupted, killed):
    killed_dir, step = killed
    assert (killed_dir / "instruct" / "meta.json").is_file()
    assert json.loads((killed_dir / "instruct" / "meta.json").read_text())["complete"] is False
    assert (killed_dir / "run.lock").is_file()  # kill -9 leaves the lock behind: the resume finds it stale
    resumed = resume_copy(world, killed_dir, base / "resumed")
    assert_identical_to(uninterrupted, resumed)
    assert not (resumed / "run.lock").exists()


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(world, base, uninterrupted, killed):
    """A save writes `.instruct.tmp/` completely, then renames it over `instruct/`. Killed while writing, the
    temporary folder is half-written and `instruct/` is the previous, intact checkpoint: resume continues from it."""
    killed_dir, step = killed
    target = base / "crash_during_write"
    shutil.copytree(killed_dir, target)
    tmp = target / ".instruct.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "deepspeed").mkdir(parents=True)
    good = (target / "instruct" / "trainable.safetensors").read_bytes()
    (tmp / "trainable.safetensors").write_bytes(good[: len(good) // 3])  # cut mid-file, no meta.json yet
    run_checked(launch_command("python", overrides(world, target, resume=True)), child_env())
    assert_identical_to(uninterrupted, target)
    assert not tmp.exists() or not (tmp / "meta.json").exists()


def test_crash_between_the_renames_of_a_save_recovers(world, base, uninterrupted, killed):
    """Killed after `instruct/` was moved aside to `.instruct.old/` but before the new folder took its place: the
    only checkpoint is `.instruct.old/`, and resume must find and use it."""
    killed_dir, step = killed
    target = base / "crash_between_renames"
    shutil.copytree(killed_dir, target)
    shutil.rmtree(target / ".instruct.old", ignore_errors=True)  # the kill may have left an older one behind
    (target / "instruct").rename(target / ".instruct.old")
    run_checked(launch_command("python", overrides(world, target, resume=True)), child_env())
    assert_identical_to(uninterrupted, target)


def test_crash_after_commit_before_cleanup_resumes(world, base, uninterrupted, killed):
    """Killed after the new checkpoint was renamed into place but before the previous one (`.instruct.old/`) was
    deleted: both folders exist; resume uses `instruct/` and its next save must not trip over the leftover."""
    killed_dir, step = killed
    target = base / "crash_before_cleanup"
    shutil.copytree(killed_dir, target)
    if not (target / ".instruct.old").exists():
        shutil.copytree(target / "instruct", target / ".instruct.old")
    run_checked(launch_command("python", overrides(world, target, resume=True)), child_env())
    assert_identical_to(uninterrupted, target)


# ------------------------------------------------------------------------------------------------- honest resume
# In-process, on the small world of train_support (no kill needed): resume=true compares the new config with the
# checkpoints' recorded config.yaml, refuses what would change training, allows and records what would not.
@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from train_support import make_small_world

    return make_small_world(tmp_path_factory.mktemp("small_world"))


def _interrupted_run(small_world, run_dir: Path, monkeypatch) -> None:
    """A 4-step pretrain that dies right after its step-2 checkpoint (save_every=2)."""
    from factory import checkpoint as ckpt
    from factory.train import loop, run
    from train_support import train_cfg

    real_save = ckpt.save_stage_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # like a Ctrl-C right after the mid-stage checkpoint

    monkeypatch.setattr(loop.ckpt, "save_stage_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(train_cfg(run_dir, small_world, stage="pretrain", **{"trainer.max_steps": 4, "trainer.save_every": 2}))
    monkeypatch.undo()


def test_resume_refuses_changes_that_alter_training(small_world, tmp_path, monkeypatch):
    from factory.errors import FactoryError
    from factory.train import run
    from train_support import train_cfg

    run_dir = tmp_path / "run"
    _interrupted_run(small_world, run_dir, monkeypatch)
    recorded = (run_dir / "pretrain" / "config.yaml").read_text()
    metrics = (run_dir / "metrics.jsonl").read_text()
    changed = {"trainer.max_steps": 4, "trainer.save_every": 2, "trainer.pretrain.lr": 0.5, "seed": 7}
    with pytest.raises(FactoryError) as err:
        run(train_cfg(run_dir, small_world, tuner="lora", stage="pretrain", resume=True, **changed))
    text = str(err.value)
    assert text.startswith(f"Cannot resume {run_dir}: the new config differs from the one its 'pretrain' checkpoint "
                           f"was trained with ({run_dir / 'pretrain' / 'config.yaml'}) in settings that change what "
                           "is trained:\n")
    for line in ("  seed: 0 -> 7", "  trainer.pretrain.lr: 0.003 -> 0.5", "  tuner.name: 'full' -> 'lora'"):
        assert line in text.splitlines(), line
    with pytest.raises(FactoryError, match=r"trainer.max_steps: 4 -> 9\n.*cosine learning-rate schedule"):
        run(train_cfg(run_dir, small_world, stage="pretrain", resume=True,
                      **{"trainer.max_steps": 9, "trainer.save_every": 2}))
    # refused means untouched: the checkpoint's provenance and the log are what the interrupted run wrote
    assert (run_dir / "pretrain" / "config.yaml").read_text() == recorded
    assert (run_dir / "metrics.jsonl").read_text() == metrics


def test_resume_allows_and_records_safe_changes_then_says_when_nothing_is_left(small_world, tmp_path, monkeypatch,
                                                                                capsys):
    import json

    from factory.train import run
    from omegaconf import OmegaConf
    from train_support import read_metrics, train_cfg

    run_dir = tmp_path / "run"
    _interrupted_run(small_world, run_dir, monkeypatch)
    safe = {"trainer.max_steps": 4, "trainer.save_every": 3, "trainer.log_every": 5}
    summary = run(train_cfg(run_dir, small_world, stage="pretrain", resume=True, **safe))
    err = capsys.readouterr().err
    assert (f"resume=true: continuing {run_dir} (stage pretrain at step 2) with changed settings that do not alter "
            "training: trainer.log_every: 1 -> 5, trainer.save_every: 2 -> 3") in err
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]  # it really trained steps 3 and 4
    record = {"completed": [], "stage": "pretrain", "step": 2,
              "changed": {"trainer.log_every": [1, 5], "trainer.save_every": [2, 3]}}
    meta = json.loads((run_dir / "pretrain" / "meta.json").read_text())
    assert meta["complete"] and meta["step"] == 4 and meta["resumes"] == [record]
    assert summary["resumed"] == record
    # provenance: the checkpoint's config is the one the last steps ran with; the invocation is kept beside the first
    assert OmegaConf.load(run_dir / "pretrain" / "config.yaml").trainer.save_every == 3
    assert list((run_dir / ".hydra").glob("resume-*/config.yaml"))

    finished_summary = (run_dir / "summary.json").read_text()
    again = run(train_cfg(run_dir, small_world, stage="pretrain", resume=True, **safe))
    assert again["nothing_to_do"] is True
    message = capsys.readouterr().err
    assert f"resume=true: nothing to train. Every stage of {run_dir} is already finished (pretrain: 4 steps)" in message
    assert (run_dir / "summary.json").read_text() == finished_summary
    assert len(read_metrics(run_dir)) == 4
