#!/usr/bin/env bash
# Several machines listed in a DeepSpeed hostfile (see hostfile.example).
#
# With ssh (DeepSpeed starts every node from the first one over pdsh/ssh; run this once, on the first host):
#   HOSTFILE=hosts scripts/launch/multi_node_hostfile.sh model=llava_7b tuner=mores deepspeed=zero3
# Without ssh (containers, clusters that start one task per node themselves): run it on EVERY node with its rank:
#   HOSTFILE=hosts NODE_RANK=0 NO_SSH=1 scripts/launch/multi_node_hostfile.sh tuner=mores    # on the first host
#   HOSTFILE=hosts NODE_RANK=1 NO_SSH=1 scripts/launch/multi_node_hostfile.sh tuner=mores    # on the second
#
# Environment: HOSTFILE (required), NODE_RANK and NO_SSH=1 (ssh-less mode), MASTER_ADDR (default: the first
# host of the hostfile), MASTER_PORT (default 29500), PYTHON (default: the repository's .venv if present).
# Every node must see the same run_dir path (shared filesystem) for checkpoints and resume.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-$([ -x "$repo/.venv/bin/python" ] && echo "$repo/.venv/bin/python" || command -v python3)}"
: "${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile (see scripts/launch/hostfile.example)}"
[ -f "$HOSTFILE" ] || { echo "HOSTFILE=$HOSTFILE does not exist" >&2; exit 2; }
master="${MASTER_ADDR:-$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')}"
args=(--hostfile "$HOSTFILE" --master_addr "$master" --master_port "${MASTER_PORT:-29500}")
if [ "${NO_SSH:-0}" = 1 ]; then
  : "${NODE_RANK:?NO_SSH=1 needs NODE_RANK (0 on the first host of the hostfile, 1 on the second, ...)}"
  args+=(--no_ssh --node_rank "$NODE_RANK")
fi
exec "$python" -m deepspeed.launcher.runner "${args[@]}" "$repo/train.py" "$@"
