#!/usr/bin/env bash
# The README's main command: set-up, then ReLoRA on the built-in corpus with the tiny recipe on 2 ranks
# (CPU, gloo; GPUs with NCCL when present), then a loss/LR plot. Extra flags go to launch/train.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
NPROC="${NPROC:-2}"
# A free rendezvous port unless MASTER_PORT is given (29500, the default, may be taken by another job).
PORT="${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
# A re-run of the demo starts over in its own runs/tiny (--overwrite), unless it is asked to resume
# (--resume, --resume-from) or given another --output-dir (whose run is never deleted without an explicit
# --overwrite): scripts/demo_plan.py reads the flags as launch/train.py does.
for a in "$@"; do  # help: the demo's own usage and train.py's flags, nothing launched
  if [[ "$a" == -h || "$a" == --help ]]; then
    echo "usage: bash scripts/demo.sh [launch/train.py flags]   (env: NPROC ranks, default 2; MASTER_PORT)"
    echo "runs launch/train.py --config launch/configs/tiny.yaml --deepspeed ds_configs/zero2.json on NPROC ranks" \
         "(a --config or --deepspeed given replaces the demo's), then plots"
    exec python launch/train.py --help
  fi
done
PLAN="$(python scripts/demo_plan.py "$@")"
OUT="$(sed -n 1p <<< "$PLAN")"
read -r -a FRESH <<< "$(sed -n 2p <<< "$PLAN")"
DS_CONFIG="$(sed -n 3p <<< "$PLAN")"  # zero2.json (bf16), or zero2_fp32.json on a CPU without native bf16
RECIPE="$(sed -n 4p <<< "$PLAN")"  # tiny.yaml, or the user's --config (given twice with one value: allowed)
deepspeed --num_gpus "$NPROC" --master_port "$PORT" launch/train.py --config "$RECIPE" \
  --deepspeed "$DS_CONFIG" ${FRESH[@]+"${FRESH[@]}"} "$@"
python launch/plot_metrics.py "$OUT/metrics.jsonl"
echo "outputs in $OUT: metrics.jsonl, curves.png, tensorboard/, checkpoints/, hf/ (Hugging Face export)"
