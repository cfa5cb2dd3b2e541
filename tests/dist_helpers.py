"""Launch real `train.py` processes (plain python, torchrun, the deepspeed launcher, two "nodes" on 127.0.0.1) on
a tiny random-weight model and the micro-world, and read back what they wrote. Shared by test_distributed.py and
test_resume.py; everything runs on CPU with gloo."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TRAIN = str(REPO / "train.py")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_overrides(run_dir: Path, data_root: Path, tuner: str = "mores", zero: int = 2, max_steps: int = 3,
                   stage: str = "all", init_from: Optional[Path] = None) -> List[str]:
    """A tiny Phi + CLIP model with random weights (seeded, so every process builds the same one), a 96-image
    micro-world, global batch 8 as 2 micro-batches of 4, lr high enough that the weights visibly move."""
    from factory.testing import tiny_tokenizer_dir

    overrides = [
        "init=random", "vision.path=null", "vision.arch=tiny-clip", "llm.path=null", "llm.arch=tiny-phi",
        f"llm.tokenizer={tiny_tokenizer_dir()}", "llm.attn_implementation=sdpa",
        f"tuner={tuner}", f"deepspeed=zero{zero}", "logger=none", "eval.enabled=false",
        f"data.root={data_root}", "data.sizes.num_train_images=96", "data.sizes.num_eval_images=8",
        f"run_dir={run_dir}", f"trainer.max_steps={max_steps}", "trainer.max_length=96",
    ]
    for stage_name in ("pretrain", "instruct"):
        overrides += [f"trainer.{stage_name}.global_batch_size=8", f"trainer.{stage_name}.micro_batch_size=4",
                      f"trainer.{stage_name}.lr=1e-3", f"trainer.{stage_name}.warmup_ratio=0"]
    if stage == "instruct":
        overrides += ["stage=instruct", f"stage.init_from={init_from}"]
    elif stage == "pretrain":
        overrides += ["stage=pretrain"]
    return overrides


def child_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)  # a launcher-less child must describe its own one-process world
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    env.update(extra)
    return env


def launch_command(launcher: str, overrides: Sequence[str], nproc: int = 1, port: Optional[int] = None) -> List[str]:
    """The command line of one launch on this machine (the same recipes docs/distributed.md gives)."""
    if launcher == "python":
        return [PYTHON, TRAIN, *overrides]
    if launcher == "single_node.sh":  # scripts/launch/single_node.sh; LAUNCHER/NPROC come from child_env
        return ["bash", str(REPO / "scripts" / "launch" / "single_node.sh"), *overrides]
    if launcher == "torchrun":
        return [PYTHON, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(port or free_port()), TRAIN, *overrides]
    if launcher == "deepspeed":
        return [PYTHON, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                "--master_port", str(port or free_port()), TRAIN, *overrides]
    raise ValueError(launcher)


def run_checked(cmd: Sequence[str], env: Dict[str, str], timeout: float = 240, cwd: Optional[Path] = None) -> str:
    proc = subprocess.run(list(cmd), env=env, cwd=str(cwd or REPO), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc.stdout


def run_many(cmds: Sequence[Sequence[str]], envs: Sequence[Dict[str, str]], timeout: float = 240) -> List[str]:
    """Start several commands at once (the nodes of one job) and wait for all; any failure fails the lot."""
    procs = [subprocess.Popen(list(c), env=e, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for c, e in zip(cmds, envs)]
    outputs, deadline, failed = [], time.time() + timeout, None
    for cmd, proc in zip(cmds, procs):
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            out, err = "", "timed out"
        outputs.append(out)
        if proc.returncode != 0 and failed is None:
            failed = f"{' '.join(cmd)}\nexit {proc.returncode}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-5000:]}"
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if failed:
        raise AssertionError(failed)
    return outputs


def read_metrics(run_dir: Path, stage: Optional[str] = None) -> List[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [r for r in records if stage is None or r["stage"] == stage]


def losses(run_dir: Path, stage: str = "instruct") -> List[float]:
    return [r["loss"] for r in read_metrics(run_dir, stage)]


def load_weights(stage_dir: Path) -> Dict[str, "object"]:
    from safetensors.torch import load_file

    return load_file(str(Path(stage_dir) / "trainable.safetensors"))


def shared_world(tmp_path_factory) -> Tuple[Path, Path]:
    """(micro-world data root, finished stage-1 checkpoint), made once per test session and reused by every test
    file: the runs under test are stage 2 (instruct), where the tuners act, started from this checkpoint."""
    base = tmp_path_factory.getbasetemp() / "dist_world"
    data_root, run_dir = base / "microworld", base / "stage1"
    if not (run_dir / "pretrain" / "meta.json").is_file():
        run_checked(launch_command("python", tiny_overrides(run_dir, data_root, stage="pretrain", max_steps=2)),
                    child_env())
    return data_root, run_dir / "pretrain"


def stage2_overrides(world: Tuple[Path, Path], run_dir: Path, tuner: str, zero: int = 2, max_steps: int = 3,
                     extra: Sequence[str] = ()) -> List[str]:
    """Stage-2 run from the shared stage-1 checkpoint. Tuner dropout is off: with dropout, 1 process draws the
    masks of both micro-batches from one RNG stream and 2 processes from two, so the curves would differ."""
    data_root, stage1 = world
    overrides = tiny_overrides(run_dir, data_root, tuner=tuner, zero=zero, max_steps=max_steps, stage="instruct",
                               init_from=stage1)
    if tuner in ("mores", "lora"):
        overrides.append("tuner.dropout=0")
    return overrides + list(extra)
