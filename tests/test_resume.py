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
    resumed = resume_copy(world, killed_dir, base / "resumed")
    assert_identical_to(uninterrupted, resumed)


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
