#!/usr/bin/env bash
# One machine, several GPUs: one training process per GPU, launched by DeepSpeed (default) or torchrun.
#
#   scripts/launch/single_node.sh model=llava_3b tuner=mores deepspeed=zero2          # all visible GPUs
#   NPROC=4 LAUNCHER=torchrun scripts/launch/single_node.sh tuner=lora deepspeed=zero3
#
# Arguments are Hydra overrides for train.py, passed through unchanged. Environment:
#   NPROC        processes (default: number of visible GPUs; on a CPU-only machine 1)
#   LAUNCHER     deepspeed | torchrun (default deepspeed)
#   MASTER_PORT  rendezvous port (default 29500; pick another when two jobs share a machine)
#   PYTHON       interpreter whose deepspeed/torchrun to use (default: the repository's .venv if present)
# On a CPU-only machine the same command runs NPROC CPU processes that talk over gloo (that is how CI tests it).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-$([ -x "$repo/.venv/bin/python" ] && echo "$repo/.venv/bin/python" || command -v python3)}"

if [ -z "${NPROC:-}" ]; then
  NPROC=$("$python" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
port="${MASTER_PORT:-29500}"

case "${LAUNCHER:-deepspeed}" in
  deepspeed)
    # --num_gpus is also the process count on CPU (without it DeepSpeed starts a single CPU process).
    # train.py takes LOCAL_RANK from the environment; the launcher's --local_rank=N argument is ignored.
    exec "$python" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "$port" \
      "$repo/train.py" "$@" ;;
  torchrun)
    exec "$python" -m torch.distributed.run --nnodes 1 --nproc_per_node "$NPROC" \
      --master_addr 127.0.0.1 --master_port "$port" "$repo/train.py" "$@" ;;
  *)
    echo "LAUNCHER must be deepspeed or torchrun, not '${LAUNCHER}'" >&2; exit 2 ;;
esac
