"""Run folders are never silently reused, and environment faults end in one clear message.

* the README's sweep (`python train.py -m tuner=mores,lora,ia3`) gives every job its own folder and checkpoint, and
  the same sweep with an explicit `run_dir=` maps every job to the same folders again (resume);
* a second run into a folder holding a run is refused; overwrite=true keeps the earlier files until the new run has
  finished; a live lock refuses, a stale one (dead pid) is taken over;
* a run_dir that is a file, a read-only disk, a full disk (real tmpfs mounts where this machine allows them, and a
  simulated ENOSPC during a checkpoint save) give a FactoryError naming the path and the fix.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dist_helpers import REPO, child_env, tiny_overrides
from factory.errors import FactoryError
from factory import checkpoint as ckpt
from factory.train import hydra_folders, run_folder
from train_support import make_small_world, read_metrics, train_cfg

TRAIN = str(REPO / "train.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_small_world(tmp_path_factory.mktemp("world"))


def small_cfg(run_dir, world, **overrides):
    return train_cfg(run_dir, world, stage="pretrain", **{"trainer.max_steps": 2, **overrides})


def train_py(args, cwd, timeout=300):
    return subprocess.run([sys.executable, TRAIN, *args], env=child_env(), cwd=str(cwd), capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------------- sweeps
def test_readme_sweep_gives_every_job_its_own_folder(tmp_path):
    """`python train.py -m tuner=mores,lora,ia3` (tiny model, 1 step per stage): 3 jobs -> 3 folders, 3 checkpoints,
    each with its own tuner's weights. The same sweep with run_dir=<that folder> resume=true finds each job's folder
    again (explicit run_dir in a sweep: <run_dir>/<job number>_<swept values>) and has nothing to train."""
    overrides = [o for o in tiny_overrides(tmp_path / "unused", tmp_path / "world", max_steps=1)
                 if not o.startswith(("run_dir=", "tuner="))]
    first = train_py(["-m", "tuner=mores,lora,ia3", *overrides], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    summaries = [json.loads(line) for line in first.stdout.splitlines() if line.startswith("{")]
    folders = [Path(s["run_dir"]) for s in summaries]
    assert [f.name for f in folders] == ["0_tuner=mores", "1_tuner=lora", "2_tuner=ia3"]
    sweep_dir = folders[0].parent
    assert sweep_dir.parent.parent == tmp_path / "outputs" and len({f.parent for f in folders}) == 1
    for folder, tuner in zip(folders, ("mores", "lora", "ia3")):
        meta = json.loads((folder / "instruct" / "meta.json").read_text())
        assert meta["complete"] and meta["tuner"] == tuner
        assert any(tuner in name for name in ckpt.load_weights_file(folder / "instruct")), tuner
        assert [r["stage"] for r in read_metrics(folder)] == ["pretrain", "instruct"]
        assert "tuner=" + tuner in (folder / ".hydra" / "overrides.yaml").read_text()

    sweep_record = (sweep_dir / "multirun.yaml").read_text()
    again = train_py(["-m", "tuner=mores,lora,ia3", *overrides, f"run_dir={sweep_dir}", "resume=true"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [json.loads(line) for line in again.stdout.splitlines() if line.startswith("{")]
    assert [Path(s["run_dir"]) for s in resumed] == folders
    assert all(s["nothing_to_do"] for s in resumed)
    assert again.stderr.count("resume=true: nothing to train.") == 3
    # Hydra rewrites multirun.yaml for the new sweep; the first sweep's copy is kept beside it
    assert [p.read_text() for p in sweep_dir.glob("multirun.*.yaml")] == [sweep_record]


def test_sweep_job_folder_names(monkeypatch):
    """Only the swept keys name a job's folder (every override would exceed a file name's 255 bytes), one folder
    level (no '/'), at most 120 characters, and never run_dir/resume/overwrite (a resumed sweep maps to the same)."""
    monkeypatch.setattr(hydra_folders, "_SWEPT_KEYS", {"tuner", "data.root"})
    overrides = ["tuner=lora", "data.root=/data/x", "trainer.max_steps=5", "run_dir=/runs/a", "resume=true"]
    assert hydra_folders.sweep_job_dirname(1, overrides) == "1_data.root=_data_x,tuner=lora"
    monkeypatch.setattr(hydra_folders, "_SWEPT_KEYS", {"seed"})
    long_name = hydra_folders.sweep_job_dirname(0, ["seed=" + "9" * 200])
    assert len(long_name) == 119 and long_name.startswith("0_seed=999") and long_name[-9] == "-"
    assert long_name != hydra_folders.sweep_job_dirname(0, ["seed=" + "9" * 199])


# ------------------------------------------------------------------------------------------------ reuse, overwrite
def test_second_run_into_a_used_folder_is_refused_and_changes_nothing(world, tmp_path):
    from factory.train import run

    run_dir = tmp_path / "run"
    run(small_cfg(run_dir, world))
    before = {p: p.read_bytes() for p in (run_dir / "metrics.jsonl", run_dir / "summary.json",
                                          run_dir / "pretrain" / "trainable.safetensors")}
    with pytest.raises(FactoryError, match=r"already holds a finished run: finished stage pretrain \(2 steps\), "
                                           r"metrics.jsonl with 2 lines, summary.json.*resume=true.*overwrite=true"):
        run(small_cfg(run_dir, world))
    assert {p: p.read_bytes() for p in before} == before
    assert not (run_dir / run_folder.LOCK_FILE).exists()  # a refused run releases the lock


def test_overwrite_keeps_the_earlier_run_until_the_new_one_finished(world, tmp_path, monkeypatch):
    from factory.train import loop, run

    run_dir = tmp_path / "run"
    run(small_cfg(run_dir, world))
    old_weights = (run_dir / "pretrain" / "trainable.safetensors").read_bytes()

    def failing_save(*args, **kwargs):
        raise RuntimeError("simulated crash before the new checkpoint")

    monkeypatch.setattr(loop.ckpt, "save_stage_checkpoint", failing_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(small_cfg(run_dir, world, overwrite=True))
    monkeypatch.undo()
    aside = [p for p in run_dir.iterdir() if p.name.startswith(run_folder.REPLACED_PREFIX)]
    assert len(aside) == 1  # the failed run deleted nothing: the earlier run waits in replaced-<time>/
    assert (aside[0] / "pretrain" / "trainable.safetensors").read_bytes() == old_weights
    assert len(read_metrics(aside[0])) == 2 and (aside[0] / "summary.json").is_file()

    with pytest.raises(FactoryError, match="contradict"):
        run(small_cfg(run_dir, world, overwrite=True, resume=True))
    summary = run(small_cfg(run_dir, world, **{"overwrite": True, "trainer.max_steps": 3}))
    assert summary["stages"]["pretrain"]["steps"] == 3 and len(read_metrics(run_dir)) == 3
    remaining = sorted(p.name for p in run_dir.iterdir() if p.name.startswith(run_folder.REPLACED_PREFIX))
    # the successful overwrite deleted only what IT replaced (the failed attempt's log); the first run stays kept
    assert remaining == [aside[0].name]


# ---------------------------------------------------------------------------------------------------------- lock
def _lock_for(pid: int) -> dict:
    return {"pid": pid, "host": socket.gethostname(), "boot_id": run_folder._boot_id(),
            "pid_start": run_folder._process_start(pid), "started": "2026-01-01 00:00:00"}


def test_a_live_run_holds_the_folder_and_a_stale_lock_is_taken_over(world, tmp_path, capsys):
    from factory.train import run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / run_folder.LOCK_FILE).write_text(json.dumps(_lock_for(live.pid)))
        with pytest.raises(FactoryError, match=rf"is in use by another run \(pid {live.pid} on host "):
            run(small_cfg(run_dir, world))
        assert not (run_dir / "metrics.jsonl").exists()
    finally:
        live.kill()
        live.wait()
    # the same lock, its process gone (kill -9 leaves exactly this): taken over with a note, and the run trains
    run(small_cfg(run_dir, world))
    assert "removed a stale lock" in capsys.readouterr().err
    assert len(read_metrics(run_dir)) == 2 and not (run_dir / run_folder.LOCK_FILE).exists()


def test_a_lock_from_another_host_is_not_guessed_stale(tmp_path):
    lock = run_folder.RunLock(tmp_path)
    (tmp_path / run_folder.LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "node-elsewhere", "started": "x"}))
    with pytest.raises(FactoryError, match=r"cannot check a process on node-elsewhere.*delete .*run.lock"):
        lock.acquire()


def test_a_lock_being_written_is_not_taken_for_a_stale_one(tmp_path):
    """Between another run's atomic create and its write, the lock is empty: that run is starting, not dead."""
    (tmp_path / run_folder.LOCK_FILE).write_text("")
    with pytest.raises(FactoryError, match="is being taken by another run that started at the same moment"):
        run_folder.RunLock(tmp_path).acquire()
    os.utime(tmp_path / run_folder.LOCK_FILE, (0, 0))  # an empty lock from long ago: a crash, taken over
    lock = run_folder.RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / run_folder.LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / run_folder.LOCK_FILE).exists()


# -------------------------------------------------------------------------------------------- environment faults
def test_run_dir_that_is_a_file_is_one_clear_message(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    for run_dir in (blocker, blocker / "run1"):
        proc = train_py([f"run_dir={run_dir}", "logger=none"], cwd=tmp_path, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"run_dir {run_dir} cannot be created: {blocker} is a file, not a folder" in proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.fixture
def tmpfs(tmp_path):
    """A real 1 MiB tmpfs (root with mount rights only): read-only and full disks that even root cannot write."""
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_read_only_disk_is_one_clear_message(world, tmpfs):
    from factory.train import run

    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with pytest.raises(FactoryError, match=rf"Cannot write {tmpfs}/run.*read-only.*run_dir=<folder>"):
        run(small_cfg(tmpfs / "run", world))


def test_full_disk_at_the_start_is_one_clear_message(world, tmpfs):
    from factory.train import run

    filler = tmpfs / "filler"
    with filler.open("wb", buffering=0) as handle:  # fill the disk to the last byte
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC
    with pytest.raises(FactoryError, match=rf"No space left on the disk while .* \({tmpfs}/run/\S+; 0 MiB free\)\. "
                                           "Free space there or point run_dir= at a disk with room"):
        run(small_cfg(tmpfs / "run", world))


def test_full_disk_while_writing_metrics_is_one_clear_message(world, tmp_path):
    """metrics.jsonl pointing at /dev/full: every write really fails with ENOSPC (no mount needed)."""
    from factory.train import run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to("/dev/full")
    with pytest.raises(FactoryError, match=rf"No space left on the disk while writing the run in {run_dir} "
                                           rf"\({run_dir}/metrics.jsonl; .*continue with resume=true"):
        run(small_cfg(run_dir, world))
    assert not (run_dir / run_folder.LOCK_FILE).exists()


def test_full_disk_during_a_checkpoint_save_keeps_the_last_one(world, tmp_path, monkeypatch):
    """ENOSPC raised by the weights write of the final save (simulated: it needs a disk that fills at exactly that
    moment): the message names the path and the fix, the step-2 checkpoint is intact, and resume=true finishes."""
    from factory import checkpoint
    from factory.train import run

    run_dir = tmp_path / "run"
    real_save_file, calls = checkpoint.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_file)  # the writer factory/checkpoint.py calls
    overrides = {"trainer.max_steps": 4, "trainer.save_every": 2}
    with pytest.raises(FactoryError, match=r"No space left on the disk while writing the run in .*"
                                           r"\.pretrain\.tmp/trainable\.safetensors.*last complete checkpoint is "
                                           r"intact: continue with resume=true"):
        run(small_cfg(run_dir, world, **overrides))
    monkeypatch.undo()
    assert json.loads((run_dir / "pretrain" / "meta.json").read_text())["step"] == 2
    summary = run(small_cfg(run_dir, world, resume=True, **overrides))
    assert summary["stages"]["pretrain"]["steps"] == 4
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]


def test_two_processes_refuse_a_used_folder_together(tmp_path):
    """torchrun, 2 ranks: rank 0 inspects and locks the folder, rank 1 waits for its decision; a refusal ends both
    ranks with the message (exit 2), none is left waiting in a collective."""
    from dist_helpers import launch_command

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"stage": "pretrain", "step": 1, "loss": 1.0}\n')
    overrides = tiny_overrides(run_dir, tmp_path / "world", stage="pretrain", max_steps=1)
    proc = subprocess.run(launch_command("torchrun", overrides, nproc=2), env=child_env(), cwd=str(REPO),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert proc.stderr.count(f"Error: run_dir {run_dir} already holds an earlier run: metrics.jsonl with 1 line.") == 2
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 1 and not (run_dir / run_folder.LOCK_FILE).exists()
    assert not (tmp_path / "world").exists()  # refused before any work: the micro-world was not generated


def test_runs_started_in_the_same_second_get_their_own_default_folders(tmp_path):
    """The default run_dir is outputs/<date>/<time>: a second run in the same second claims `<time>-1` (mkdir is
    atomic); an explicit run_dir= is never changed (the lock and the reuse check guard it)."""
    from omegaconf import OmegaConf

    def hydra_config(overrides):
        return OmegaConf.create({"run_dir": str(tmp_path / "outputs" / "d" / "10-00-00"),
                                 "hydra": {"run": {"dir": "${run_dir}"}, "overrides": {"task": overrides}}})

    first, second = hydra_config(["tuner=lora"]), hydra_config(["tuner=lora"])
    hydra_folders.PrepareRunFolder().on_run_start(first)
    hydra_folders.PrepareRunFolder().on_run_start(second)
    assert first.run_dir.endswith("10-00-00") and second.hydra.run.dir == first.run_dir + "-1"
    assert Path(second.run_dir).is_dir()
    explicit = hydra_config([f"run_dir={tmp_path / 'outputs' / 'd' / '10-00-00'}"])
    hydra_folders.PrepareRunFolder().on_run_start(explicit)
    assert explicit.run_dir == first.run_dir
