#!/usr/bin/env bash
# One prepared device call for the open GPU work of the kernels and int8 issues (see BENCHMARKS.md).
#   bash launch/gpu_check.sh [stage ...]     stages: env tests tune bench int8 e2e loss ds (default: env tests tune bench int8)
# `ds` (the 1b peak memory under a DeepSpeed engine, bf16 vs int8 base) needs the wheels of
# scripts/gpu_wheels.sh: build them here, then name ".whl" in the device call's carry.
# Results go to $OUT (the device tool's output folder; default runs/gpu). Each stage has its own time limit
# and a failing stage does not stop the next: the device call is the scarce thing. Budget: tests ~170 s,
# tune ~200 s, bench ~90 s, int8 ~60 s, e2e ~120 s, loss ~120 s; the device tool allows 600 s per call, so run
# `env tests tune` in one call and `bench int8` (+ e2e) in the next.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
# The GPU image cannot pip-install (offline, no setuptools wheel): kernels/ goes on the path as relora_kernels.
mkdir -p /tmp/pk && ln -sfn "$PWD/kernels" /tmp/pk/relora_kernels
export PYTHONPATH="/tmp/pk:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export RELORA_KERNELS=triton
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env tests tune bench int8)

run() {  # run NAME LIMIT_S CMD...: log to $OUT/NAME.log, record the exit status and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc ${limit}s-limit took=$((SECONDS - t0))s" | tee -a "$OUT/stages.txt"
  tail -n 25 "$OUT/$name.log"
}

for st in "${stages[@]}"; do
  case $st in
    env) run env 60 bash -c 'nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"' ;;
    tests) run tests 240 bash -c 'python3 -m pytest -q -x -k cuda tests/test_kernels.py tests/test_int8_quant.py;
             a=$?; env -u RELORA_KERNELS python3 -m pytest -q -x tests/test_kernel_dispatch.py; exit $((a | $?))' ;;
    tune) run tune 260 python3 launch/tune_kernels.py --out "$OUT/tune_kernels.json" ;;
    bench) run bench 150 python3 launch/bench_kernels.py --quick --out "$OUT/bench_kernels.csv" ;;
    int8) run int8 120 python3 launch/bench_int8.py --sections kernels --out "$OUT/bench_int8.json" ;;
    e2e) run e2e 240 python3 launch/bench_e2e.py --presets 350m 1b --paths reference torch torch_merged triton \
           --interleave --steps 6 --out "$OUT/e2e.json" ;;  # one model per preset, paths alternating
    loss) for c in 0 1024; do  # the chunked loss: tokens/s and peak memory, with activation checkpointing
            run "loss_chunk$c" 150 python3 launch/bench_e2e.py --presets 1b --paths auto --micro-batch 16 \
              --activation-checkpointing --loss-chunk-size $c --steps 6 --out "$OUT/e2e_loss_chunk$c.json"; done ;;
    ds)
      if ! python3 -c "import deepspeed" 2>/dev/null; then
        [ -d .whl ] || { echo "ds: no .whl/ (run scripts/gpu_wheels.sh here and carry .whl)" | tee -a "$OUT/stages.txt"; continue; }
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site:$PYTHONPATH"
      fi
      run ds 300 env RELORA_KERNELS=auto python3 launch/bench_memory_ds.py --preset 1b --deepspeed ds_configs/zero2.json --out "$OUT/memory_ds.json" ;;
    *) echo "unknown stage $st (valid: env tests tune bench int8 e2e loss ds)" >&2; exit 2 ;;
  esac
done
