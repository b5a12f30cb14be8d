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
# A re-run of the demo starts over in its own runs/tiny (--overwrite), unless it is asked to --resume or
# given another --output-dir (whose run is never deleted without an explicit --overwrite).
FRESH=(--overwrite)
for arg in "$@"; do [[ "$arg" == --resume || "$arg" == --overwrite || "$arg" == --output-dir* ]] && FRESH=(); done
deepspeed --num_gpus "$NPROC" --master_port "$PORT" launch/train.py --config launch/configs/tiny.yaml \
  --deepspeed ds_configs/zero2.json ${FRESH[@]+"${FRESH[@]}"} "$@"
OUT="$(python - "$@" <<'PY'
import sys, argparse
from relora_ds.train_config import build_parser, config_from_args
args, _ = build_parser(argparse.ArgumentParser()).parse_known_args(["--config", "launch/configs/tiny.yaml", *sys.argv[1:]])
print(config_from_args(args).output_dir)
PY
)"
python launch/plot_metrics.py "$OUT/metrics.jsonl"
echo "outputs in $OUT: metrics.jsonl, curves.png, tensorboard/, checkpoints/, hf/ (Hugging Face export)"
