"""Multi-process training is the same computation as one process: real `train.py` processes on CPU (gloo).

Every run is stage 2 (instruct) of a tiny random-weight model from one shared stage-1 checkpoint, global batch 8,
3 optimizer steps. The reference is one plain `python train.py` process (2 micro-batches of 4, accumulated); the
runs under test use 2 processes (1 micro-batch of 4 each) started the ways docs/distributed.md describes:
scripts/launch/single_node.sh with torchrun (ZeRO-2) and with the deepspeed launcher (ZeRO-3), two "nodes" on
127.0.0.1 with torchrun's c10d rendezvous and with a DeepSpeed hostfile (ssh-less), and scripts/launch/slurm.sbatch
under a stand-in `srun`. Each loss must equal the reference's up to float summation order (rtol 1e-5; measured
differences are ~1e-7), and so must the saved trainable weights. Runs are launched once per module and shared.
"""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch

from dist_helpers import (REPO, child_env, free_port, launch_command, load_weights, losses, read_metrics, run_checked,
                          run_many, shared_world, stage2_overrides)

LOSS_RTOL = 1e-5      # fp32; 1 vs 2 processes differ only in the order gradients are summed
WEIGHT_ATOL = 1e-5    # after 3 AdamW steps at lr 1e-3
SCRIPTS = REPO / "scripts" / "launch"

# (launch, tuner) → (zero stage, how it is started). The matrix covers every tuner under both ZeRO stages and both
# launchers without the full cross product (each 2-process launch costs ~20 s of CPU).
SINGLE_NODE = {("torchrun", "full"): 2, ("torchrun", "mores"): 2, ("torchrun", "lora"): 2,
               ("deepspeed", "full"): 3, ("deepspeed", "mores"): 3, ("deepspeed", "lora"): 3}
MULTI_NODE = {"two_nodes_torchrun": ("mores", 3), "two_nodes_deepspeed": ("full", 2), "slurm": ("lora", 2)}


class Runs:
    """Launch each configuration once, on first use, and remember its run dir."""

    def __init__(self, base: Path, world: Tuple[Path, Path]):
        self.base, self.world, self.done = base, world, {}

    def get(self, key) -> Path:
        if key[0] == "ref" and key not in self.done:
            self._launch_references()
        if key not in self.done:
            self.done[key] = self._launch(key)
        return self.done[key]

    def _launch_references(self) -> None:
        """The three 1-process references side by side: each uses one core (OMP_NUM_THREADS=1)."""
        tuners = [t for t in ("full", "mores", "lora") if ("ref", t) not in self.done]
        cmds = [launch_command("python", stage2_overrides(self.world, self.base / f"ref_{t}", t)) for t in tuners]
        run_many(cmds, [child_env() for _ in cmds])
        self.done.update({("ref", t): self.base / f"ref_{t}" for t in tuners})

    def _launch(self, key) -> Path:
        name = key if isinstance(key, str) else "_".join(key)
        run_dir = self.base / name
        if key in SINGLE_NODE:
            launcher, tuner = key
            overrides = stage2_overrides(self.world, run_dir, tuner, zero=SINGLE_NODE[key],
                                         extra=["trainer.save_every=2"] if SINGLE_NODE[key] == 3 else [])
            env = child_env(LAUNCHER=launcher, NPROC="2", MASTER_PORT=str(free_port()))
            run_checked(launch_command("single_node.sh", overrides), env)
        elif key == "two_nodes_torchrun":
            tuner, zero = MULTI_NODE[key]
            overrides, port = stage2_overrides(self.world, run_dir, tuner, zero=zero), free_port()
            cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                     "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                     "--rdzv_id", "factory-test", str(REPO / "train.py"), *overrides] for rank in (0, 1)]
            run_many(cmds, [child_env(), child_env()])
        elif key == "two_nodes_deepspeed":
            tuner, zero = MULTI_NODE[key]
            hostfile = self.base / "hostfile"
            hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")  # two "machines", one process each
            overrides, port = stage2_overrides(self.world, run_dir, tuner, zero=zero), str(free_port())
            cmd = ["bash", str(SCRIPTS / "multi_node_hostfile.sh"), *overrides]
            run_many([cmd, cmd], [child_env(HOSTFILE=str(hostfile), NO_SSH="1", NODE_RANK=str(rank), MASTER_PORT=port)
                                  for rank in (0, 1)])
        elif key == "slurm":
            tuner, zero = MULTI_NODE[key]
            overrides = stage2_overrides(self.world, run_dir, tuner, zero=zero)
            env = child_env(PATH=f"{fake_slurm(self.base)}{os.pathsep}{os.environ['PATH']}", SLURM_NNODES="2",
                            SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_ID="4242", GPUS_PER_NODE="1",
                            FACTORY_REPO=str(REPO), PYTHON=sys.executable, MASTER_PORT=str(free_port()))
            run_checked(["bash", str(SCRIPTS / "slurm.sbatch"), *overrides], env)
        else:
            raise KeyError(key)
        return run_dir


def fake_slurm(base: Path) -> Path:
    """`srun` that starts its command once per node on this machine, and `scontrol` that names 127.0.0.1."""
    bin_dir = base / "fake_slurm_bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\nwhile [[ \"$1\" == -* ]]; do shift; done\npids=()\n"
        "for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n SLURM_PROCID=$n \"$@\" & pids+=($!); done\n"
        "status=0; for p in \"${pids[@]}\"; do wait \"$p\" || status=$?; done; exit $status\n")
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod((bin_dir / tool).stat().st_mode | stat.S_IEXEC)
    return bin_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("distributed"), shared_world(tmp_path_factory))


def assert_same_curve(reference: Path, other: Path) -> None:
    ref_records, records = read_metrics(reference, "instruct"), read_metrics(other, "instruct")
    assert [r["step"] for r in records] == [1, 2, 3], "one metrics line per optimizer step, written by rank 0 only"
    ref, got = losses(reference), losses(other)
    assert ref[-1] < ref[0], f"the reference did not train (losses {ref}), so the comparison proves nothing"
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=LOSS_RTOL, atol=0.0)
    assert [r["lr"] for r in records] == [r["lr"] for r in ref_records]


def assert_same_weights(reference: Path, other: Path) -> Dict[str, torch.Tensor]:
    ref, got = load_weights(reference / "instruct"), load_weights(other / "instruct")
    assert sorted(got) == sorted(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0.0, atol=WEIGHT_ATOL, msg=name)
    return got


@pytest.mark.parametrize("launcher,tuner", list(SINGLE_NODE), ids=[f"{l}-zero{z}-{t}" for (l, t), z in SINGLE_NODE.items()])
def test_two_processes_match_one(runs, launcher, tuner):
    reference, run = runs.get(("ref", tuner)), runs.get((launcher, tuner))
    assert_same_curve(reference, run)
    assert_same_weights(reference, run)


@pytest.mark.slow
@pytest.mark.parametrize("launch", list(MULTI_NODE))
def test_two_nodes_match_one_process(runs, launch):
    tuner, _ = MULTI_NODE[launch]
    reference, run = runs.get(("ref", tuner)), runs.get(launch)
    assert_same_curve(reference, run)
    assert_same_weights(reference, run)


def expected_trainable_names(runs, tuner: str) -> set:
    """The parameters stage 2 trains for this tuner, from the same config built in this process."""
    from factory.config import compose
    from factory.model.build import build_model
    from factory.stages import tune_for_stage
    from factory.tuners import apply_tuning

    cfg = compose(stage2_overrides(runs.world, runs.base / "unused", tuner))
    model = build_model(cfg)
    apply_tuning(model, cfg.tuner, tune_for_stage(cfg, "instruct"))
    return set(model.trainable_state_dict())


@pytest.mark.parametrize("tuner", ["full", "mores", "lora"])
def test_zero3_saves_gathered_trainable_weights_only(runs, tuner):
    run = runs.get(("deepspeed", tuner))  # ZeRO-3, 2 processes, trainer.save_every=2
    saved = load_weights(run / "instruct")
    expected = expected_trainable_names(runs, tuner)
    assert set(saved) == expected
    assert not any(name.startswith("vision.") for name in saved), "the frozen vision tower must not be saved"
    if tuner != "full":
        assert all(name.startswith("connector.") or tuner in name or "lora_" in name for name in saved)
    # gathered, not this rank's shard: full shapes, identical to the 1-process run (assert_same_weights)
    assert_same_weights(runs.get(("ref", tuner)), run)
    # the finished stage is never resumed, so its checkpoint keeps no DeepSpeed state even though the run saved
    # mid-stage (save_every=2); test_untrusted_files checks what a mid-stage state holds
    assert not (run / "instruct" / "deepspeed").exists()


def test_a_child_does_not_take_its_parents_self_described_world_for_a_launchers(monkeypatch):
    """A script that trained in-process (holding MASTER_PORT) and then starts train.py must not make it reuse the port."""
    import socket

    from factory.distributed import SELF_DESCRIBED, fill_single_process_env

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", SELF_DESCRIBED):
        monkeypatch.delenv(key, raising=False)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        parent_port = str(held.getsockname()[1])
        # What the parent's environment looks like after it described its own one-process world.
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "1")
        monkeypatch.setenv("MASTER_PORT", parent_port)
        monkeypatch.setenv(SELF_DESCRIBED, "1")
        fill_single_process_env()
        assert os.environ["MASTER_PORT"] != parent_port and os.environ[SELF_DESCRIBED] == "1"
        # A launcher's world (no marker) is never touched.
        monkeypatch.delenv(SELF_DESCRIBED)
        monkeypatch.setenv("RANK", "3")
        monkeypatch.setenv("MASTER_PORT", parent_port)
        fill_single_process_env()
        assert os.environ["RANK"] == "3" and os.environ["MASTER_PORT"] == parent_port
        assert SELF_DESCRIBED not in os.environ
