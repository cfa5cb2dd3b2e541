#!/usr/bin/env bash
# The GPU check of the bf16 path (issue 12), one script that finishes in <= 8 minutes on one H100/H200.
#
#   bash scripts/gpu_check.sh [RESULTS_DIR]              # default: $OUT when set, else gpu_results/
#   bash scripts/gpu_check.sh --tiny --only train DIR    # the same commands at test size on a CPU (tests use it)
#
# A GPU image without network that lacks deepspeed, hydra-core, omegaconf, open_clip_torch or wandb needs their
# wheels in .whl/ (Python 3.12, x86-64; `pip download` / `pip wheel` them where there is network — the developers'
# ../shared/gpu/wheelhouse.sh does exactly that); the env section installs them into /tmp/site. If the image has no
# pytest either, add its pure-Python wheels too:
#   python3 -m pip download -q --no-deps --only-binary=:all: -d .whl pytest iniconfig pluggy pygments
#
# Sections (each under its own time limit, all under one overall deadline, a failing one does not stop the rest):
#   env       wheels installed into /tmp/site (skipped when the packages import), nvidia-smi, versions
#   pytest    pytest -m gpu tests/test_gpu.py, then tests/test_qlora.py (tuner=qlora on CUDA; skipped when
#             bitsandbytes is missing: add its wheel to .whl/, `pip download --no-deps --only-binary=:all:
#             --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2`, a py3-none wheel)
#   bench3b   scripts/bench_throughput.py llava_3b batch 8 seq 800: frozen, mores, lora, full + HF baselines
#   train     20 steps of `train.py model=llava_3b init=random tuner=mores` (ZeRO-2, bf16) on synthetic LLaVA data
#   bench13b  llava_13b MoReS micro-batch 4 seq 2048 (peak memory: fits 80 GB or not), then the same with
#             gradient checkpointing
# Everything lands in RESULTS_DIR: one log and one result file per section, and summary.md at the end.
set -uo pipefail

TINY=0
ONLY="env,pytest,bench3b,train,bench13b"
RES=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=1 ;;
    --only) shift; ONLY="${1:?--only needs a comma list of sections}" ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1 (use --tiny, --only LIST, RESULTS_DIR)" >&2; exit 2 ;;
    *) RES="$1" ;;
  esac
  shift
done
for section in ${ONLY//,/ }; do
  case "$section" in env|pytest|bench3b|train|bench13b) ;;
    *) echo "gpu_check.sh: unknown section '$section' (env, pytest, bench3b, train, bench13b)" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
RES="${RES:-${OUT:-gpu_results}}"
mkdir -p "$RES"
RES="$(cd "$RES" && pwd)"
if [ -e "$RES/summary.md" ]; then
  echo "gpu_check.sh: $RES already holds results (summary.md); pick an empty folder." >&2
  exit 2
fi
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO:/tmp/site:${PYTHONPATH:-}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
START=$(date +%s)
DEADLINE=$((START + 470))  # 8 minutes minus a margin for the summary
log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$RES/gpu_check.log"; }
wants() { [[ ",$ONLY," == *",$1,"* ]]; }

# run NAME CAP_SECONDS CMD...: stdout+stderr to RES/NAME.log, status to RES/status.txt; never aborts the script
run() {
  local name="$1" cap="$2"; shift 2
  local left=$((DEADLINE - $(date +%s)))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 20 ]; then
    log "$name: skipped, out of time"; echo "$name skipped-out-of-time" >> "$RES/status.txt"; return 0
  fi
  log "$name: start (limit ${limit}s)"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  local what=ok
  [ "$rc" -eq 124 ] && what=timeout
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && what="failed(rc=$rc)"
  log "$name: $what after ${took}s"; echo "$name $what ${took}s" >> "$RES/status.txt"
  return 0
}

if [ "$TINY" = 1 ]; then
  TOK="$($PY -c 'from factory.testing import tiny_tokenizer_dir; print(tiny_tokenizer_dir())')"
  # the tiny random model of tests/dist_helpers.py (CLIP + Phi, 2 layers)
  MODEL_3B=(init=random vision.path=null vision.arch=tiny-clip llm.path=null llm.arch=tiny-phi "llm.tokenizer=$TOK")
  BENCH_SIZE=(--size tiny --device cpu --steps 1 --warmup 0)
  STEPS=3; MICRO=4; IMAGE=32; WORKERS=0
else
  TOK="tests/fixtures/tokenizers/gpt2/phi2_codegen"
  [ -d "$TOK" ] || TOK="$($PY -c 'from factory.testing import tiny_tokenizer_dir; print(tiny_tokenizer_dir())')"
  MODEL_3B=(model=llava_3b init=random "llm.tokenizer=$TOK")
  BENCH_SIZE=(--size real --steps 5 --warmup 2)
  STEPS=20; MICRO=16; IMAGE=384; WORKERS=4
fi

# ---------------------------------------------------------------------------------------------------- env
if wants env; then
  if $PY -c "import deepspeed, hydra, omegaconf, open_clip, wandb" >/dev/null 2>&1; then
    log "env: deepspeed, hydra, omegaconf, open_clip and wandb already import"
  elif ls .whl/*.whl >/dev/null 2>&1; then
    run wheels 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  else
    log "env: deepspeed & co. are missing and there is no .whl/ folder: run ../shared/gpu/wheelhouse.sh on the CPU machine and carry .whl"
  fi
  missing="$($PY -c '
import importlib.util as u
print(" ".join(m for m in ("deepspeed", "hydra", "omegaconf", "open_clip", "wandb", "pytest", "bitsandbytes") if u.find_spec(m) is None))')"
  [ -n "$missing" ] && log "env: STILL MISSING: $missing (the sections that need them will fail; see the header of this script)"
  { nvidia-smi 2>&1 || true; } > "$RES/nvidia-smi.txt"
  # the JSON goes to a file, not stdout: importing deepspeed prints a line on stdout
  $PY - "$RES/env.json" > "$RES/env.log" 2>&1 <<'EOF'
import json, platform, sys, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
for name in ("transformers", "peft", "deepspeed", "timm", "open_clip", "hydra", "omegaconf"):
    try:
        info[name] = __import__(name).__version__
    except Exception as err:  # report, do not stop the check
        info[name] = f"missing ({type(err).__name__})"
try:
    import subprocess
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                                    capture_output=True, text=True).stdout.strip()
except Exception:
    info["driver"] = None
open(sys.argv[1], "w").write(json.dumps(info, indent=2) + "\n")
EOF
  log "env: $(tr -d '\n' < "$RES/env.json" | tr -s ' ')"
fi

# ---------------------------------------------------------------------------------------------------- pytest -m gpu
if wants pytest; then
  # only the file that holds the gpu tests: one test module failing to import elsewhere must not stop collection
  run pytest_gpu 150 $PY -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu.py --junitxml="$RES/pytest_gpu.xml"
  run pytest_qlora 60 $PY -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_qlora.py --junitxml="$RES/pytest_qlora.xml"
fi

# ---------------------------------------------------------------------------------------------------- llava_3b bench
if wants bench3b; then
  run bench_3b 170 $PY scripts/bench_throughput.py --model llava_3b --tuners frozen,mores,lora,full --batch 8 \
    --seq 800 "${BENCH_SIZE[@]}" --json "$RES/bench_3b.json"
fi

# ---------------------------------------------------------------------------------------------------- train.py 20 steps
if wants train; then
  SYN="$RES/synthetic_llava"
  # 1 stage-1 step (16 captions = one global batch) builds the stage-1 checkpoint; then STEPS stage-2 steps
  $PY scripts/make_synthetic_llava.py "$SYN" --pretrain "$MICRO" --instruct $((STEPS * MICRO)) --images 16 \
    --image-size "$IMAGE" --answer-words 60 > "$RES/synthetic_llava.log" 2>&1
  run train_3b 170 $PY train.py "${MODEL_3B[@]}" tuner=mores stage=all trainer=paper deepspeed=zero2 \
    trainer.precision=bf16 logger=none data=llava_v15 "run_dir=$RES/train_3b" \
    "data.pretrain.json=$SYN/pretrain.json" "data.pretrain.image_folder=$SYN/images" \
    "data.instruct.json=$SYN/instruct.json" "data.instruct.image_folder=$SYN/images" \
    "trainer.pretrain.global_batch_size=$MICRO" "trainer.pretrain.micro_batch_size=$MICRO" \
    "trainer.instruct.global_batch_size=$MICRO" "trainer.instruct.micro_batch_size=$MICRO" \
    "trainer.max_steps=$STEPS" "trainer.num_workers=$WORKERS"
  $PY - "$RES/train_3b/metrics.jsonl" "$RES/train_3b.json" <<'EOF'
import json, statistics, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
if not src.is_file():
    dst.write_text(json.dumps({"error": f"{src} was not written (see train_3b.log)"}) + "\n")
    sys.exit(0)
steps = [json.loads(line) for line in src.read_text().splitlines() if json.loads(line)["stage"] == "instruct"]
timed = steps[5:] or steps  # the first steps include allocator warm-up and the data loader start
report = {"instruct_steps": len(steps), "timed_steps": len(timed),
          "samples_per_s_mean": statistics.mean(r["samples_per_s"] for r in timed) if timed else None,
          "samples_per_s_median": statistics.median(r["samples_per_s"] for r in timed) if timed else None,
          "tokens_per_s_mean": statistics.mean(r["tokens_per_s"] for r in timed) if timed else None,
          "losses": [round(r["loss"], 4) for r in steps]}
dst.write_text(json.dumps(report, indent=2) + "\n")
EOF
  log "train: $(tr -d '\n' < "$RES/train_3b.json" | tr -s ' ' | cut -c1-300)"
fi

# ---------------------------------------------------------------------------------------------------- llava_13b memory
if wants bench13b; then
  if [ "$TINY" = 1 ]; then SIZE13=(--size tiny --device cpu --steps 1 --warmup 0); else SIZE13=(--steps 2 --warmup 1); fi
  run bench_13b 100 $PY scripts/bench_throughput.py --model llava_13b --tuners mores --baseline none --batch 4 \
    --seq 2048 "${SIZE13[@]}" --json "$RES/bench_13b.json"
  run bench_13b_gc 80 $PY scripts/bench_throughput.py --model llava_13b --tuners mores --baseline none --batch 4 \
    --seq 2048 "${SIZE13[@]}" --gradient-checkpointing --json "$RES/bench_13b_gc.json"
fi

# ---------------------------------------------------------------------------------------------------- summary
$PY - "$RES" <<'EOF' > "$RES/summary.md" 2>&1
import json, sys
from pathlib import Path
res = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((res / name).read_text())
    except Exception:
        return None
out = ["# GPU check", "", "## status", "```", (res / "status.txt").read_text().strip() if (res / "status.txt").exists()
       else "(no section ran)", "```"]
env = load("env.json")
if env:
    out += ["", "## environment", "```", json.dumps(env, indent=1), "```"]
for name, title in (("pytest_gpu", "pytest -m gpu"), ("pytest_qlora", "pytest -m gpu tests/test_qlora.py")):
    log = res / f"{name}.log"
    if log.exists():
        lines = [l for l in log.read_text().splitlines() if l.strip()]
        out += ["", f"## {title}", "```", *lines[-15:], "```"]
for name, title in (("bench_3b.json", "llava_3b, batch 8, seq 800"), ("bench_13b.json", "llava_13b MoReS, micro-batch 4, seq 2048"),
                    ("bench_13b_gc.json", "llava_13b MoReS, micro-batch 4, seq 2048, gradient checkpointing")):
    data = load(name)
    if data:
        out += ["", f"## {title}", "", data["table"]]
        for row in data["rows"]:
            if "13b" in name:  # an 80 GB H100 offers 79.6 GiB; keep ~0.6 GiB for the CUDA context
                held = max(row["peak_mem_gib"], row.get("peak_reserved_gib") or 0.0)
                out += ["", f"peak {row['peak_mem_gib']:.1f} GiB allocated, {held:.1f} GiB reserved: "
                        f"{'fits' if held <= 79.0 else 'does NOT fit'} in an 80 GB GPU"]
train = load("train_3b.json")
if train:
    out += ["", "## train.py model=llava_3b init=random tuner=mores (ZeRO-2, bf16, synthetic data)", "```",
            json.dumps(train, indent=1), "```"]
print("\n".join(out))
EOF
log "done: $RES/summary.md"
cat "$RES/summary.md"
