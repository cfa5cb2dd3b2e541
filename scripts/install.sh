#!/usr/bin/env bash
# Create ./.venv and install the factory with its pinned dependencies (CPU or GPU machine).
# torch and torchvision are pinned together in requirements.txt: other pairs fail to import torchvision (and peft).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -r requirements.txt
# lmms-eval without its own dependency pins, which conflict with ours (why: requirements-lmms-eval.txt)
.venv/bin/pip install -q --no-deps -r requirements-lmms-eval.txt
.venv/bin/pip install -q --no-deps -e .
echo "installed: $(.venv/bin/python -c 'import torch, transformers, deepspeed; print("torch", torch.__version__, "transformers", transformers.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null | tail -1)"
