#!/usr/bin/env bash
# One prepared device call for the open GPU work of the kernels and int8 issues (see BENCHMARKS.md).
#   GPU_CHECK_BUDGET=540 bash launch/gpu_check.sh [stage ...]
#   stages: env tune e2e tests bench host tma int8 loss ds compile ckpt (default: env bench host tune tests e2e tma int8 loss)
# The default order is what the open targets need first after the H200 run of 2026-12-04 (which ran bench, tma,
# int8, e2e, ds and most of tests): the layer throughput again with each timing's host time beside it (bench:
# is the fused layer launch-bound at d=2048? its fwd+bwd read 1.34 ms against 0.38 + 0.63 ms timed apart; it
# also repeats the one-pass 0.749 at d=4096 and times the merge with 3xTF32 products for fp32 factors), the
# host time of one fwd+bwd against its GPU time at 350m's layer and at d=2048, with a cProfile of where the
# fused path's host time goes (host: launch/bench_host_overhead.py, ~20 s each after bench compiled), where
# the fused layer's time goes launch by launch and the launch-config sweep with the merges (tune:
# tune_kernels.py), the compiled cases not yet seen on a GPU (tests: launch/gpu_tests.sh, one pytest process
# per group), whole training steps with the best fused variant at d=4096 (e2e: TMA GEMMs + cuBLAS rank-r,
# beside the twin, the torch chain and the default Triton path; 1b first), then the TMA candidates in their
# own process (tma), the int8 ratio (int8) and the chunked loss (loss).
# Stage limits: bench 120 s, tma 90 s, int8 90 s, e2e 180 s, tests 150 s (measured on an H200 on 2026-12-04:
# bench 67 s (before its host_ms column: ~0.1 s more per layer row, ~15 s), tma 34 s, int8 71 s, e2e 116 s, ds 50 s; tests cut at 150 s, and a second call
# of 2 minutes ran more of the CUDA kernel tests), loss 240 s, host 90 s, tune 200 s (neither run yet; the
# sweep is cut there, the breakdown runs first): at the default budget env, bench, host, tune and tests leave
# e2e 0-60 s, so it and the stages after it run only when those before them finish early: name them in a
# second call (`bash launch/gpu_check.sh e2e tma int8`).
# The benchmarks write each row the moment it is measured, so a stage cut at its limit keeps its rows.
# A task lent a GPU gets 15 minutes of device time in all, machine start included, and one call may run
# 600 s: with GPU_CHECK_BUDGET (seconds, default 540; 0: none) each stage is cut to what is left and
# skipped once less than 45 s remain. Each stage has its own time limit and a failing stage does not stop the next
# (but a failed env does: no usable GPU); the script exits 1 when any stage failed.
# `compile` (not run yet; 420 s: six processes, 350m and 1b on the default path and 1b on the Triton path, each
# eager and with the trainer's --compile, compiled in their warm-up steps) times whole steps.
# `ckpt` (not run yet; 240 s) times 1b steps under full and selective checkpointing and without.
# `ds` (the 1b peak memory and step time under a DeepSpeed engine: ReLoRA on a bf16 and an int8 base, then
# full-rank training, the paper's memory and speed claim; 200 s: the two ReLoRA bases took 50 s on 2026-12-04) needs
# the wheels of scripts/gpu_wheels.sh: build them here, then name ".whl" in the device call's carry. It then
# times ReLoRA (bf16 base) under ZeRO-3 eagerly and with --compile (ds_zero3, 240 s; not run yet).
# Results: the device tool returns at most 8 files from $OUT, so the stages write to a work folder that is
# packed into $OUT/gpu_check.tar.gz after every stage (a call killed at its limit still returns the stages
# done); $OUT/stages.txt lists each stage's exit status and time. Default $OUT: runs/gpu.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
FINAL_OUT="${OUT:-runs/gpu}"
mkdir -p "$FINAL_OUT"
OUT=$(mktemp -d)
BUDGET=${GPU_CHECK_BUDGET:-540}  # one device call may run 600 s; 0: no budget
START=$SECONDS
# The GPU image cannot pip-install (offline, no setuptools wheel): kernels/ goes on the path as relora_kernels.
mkdir -p /tmp/pk && ln -sfn "$PWD/kernels" /tmp/pk/relora_kernels
export PYTHONPATH="/tmp/pk:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export RELORA_KERNELS=triton
export PYTHONUNBUFFERED=1  # a stage killed at its limit still leaves its output in the log
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env bench host tune tests e2e tma int8 loss)
valid=" env tune e2e tests bench host tma int8 loss ds compile ckpt "
for st in "${stages[@]}"; do  # a typo must not burn a device call
  [[ "$valid" == *" $st "* ]] || { echo "unknown stage $st (valid:$valid)" >&2; exit 2; }
done

pack() {  # everything so far into one file, and the stage list beside it
  tar -czf "$FINAL_OUT/gpu_check.tar.gz.tmp" -C "$OUT" . && mv "$FINAL_OUT/gpu_check.tar.gz.tmp" "$FINAL_OUT/gpu_check.tar.gz"
  cp "$OUT/stages.txt" "$FINAL_OUT/stages.txt" 2>/dev/null || true
}
trap 'pack; exit 143' TERM  # killed at the device call's limit: the stage then running keeps its rows

failed=()  # the stages that exited nonzero: the script then exits 1, after running the others
run() {  # run NAME LIMIT_S CMD...: log to $OUT/NAME.log, record the exit status and seconds
  local name=$1 limit=$2; shift 2
  if (( BUDGET > 0 )); then
    local left=$(( BUDGET - (SECONDS - START) ))
    if (( left < 45 )); then
      echo "$name skipped: ${left}s of GPU_CHECK_BUDGET=${BUDGET}s left" | tee -a "$OUT/stages.txt"
      pack
      return
    fi
    (( limit > left )) && limit=$left
  fi
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1  # -k: a rank stuck in a CUDA sync ignores TERM
  local rc=$?
  (( rc != 0 )) && failed+=("$name")
  echo "$name rc=$rc ${limit}s-limit took=$((SECONDS - t0))s" | tee -a "$OUT/stages.txt"
  tail -n 25 "$OUT/$name.log"
  pack
}

for st in "${stages[@]}"; do
  case $st in
    env) run env 60 bash -c 'nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"'
       if [[ " ${failed[*]} " == *" env "* ]]; then  # no usable GPU: every later stage would fail the same way
         echo "stopped: env failed (no GPU, or torch/triton do not import), so the other stages were not run" \
           | tee -a "$OUT/stages.txt"
         pack
         exit 1
       fi ;;
    bench) run bench 120 python3 launch/bench_kernels.py --quick --repeat 2 --out "$OUT/bench_kernels.csv" \
             --providers full frozen peft torch_fused fused fused_splitdb fused_det fused_blas_lr ;;
    tma) run tma 90 python3 launch/bench_kernels.py --quick --ops linear --out "$OUT/bench_kernels_tma.csv" \
           --providers full peft fused fused_tma fused_tma_blas_lr ;;  # the baselines again, for its own ratios
    int8) run int8 90 python3 launch/bench_int8.py --device cuda --sections kernels --out "$OUT/bench_int8.json" ;;
    e2e) run e2e 180 python3 launch/bench_e2e.py --presets 1b 350m --paths reference torch triton triton_tma_blas_lr \
           --interleave --steps 6 --out "$OUT/e2e.json" ;;  # one model per preset, paths alternating
    tests) run tests 150 bash launch/gpu_tests.sh ;;
    compile) run compile 420 bash -c 'for c in "" --compile; do python3 launch/bench_e2e.py --presets 350m 1b \
               --paths auto --steps 6 $c --out "$1/e2e_compile${c:+d}.json"; python3 launch/bench_e2e.py \
               --presets 1b --paths triton --steps 6 $c --out "$1/e2e_compile_triton${c:+d}.json"; done' _ "$OUT" ;;
             # whole steps eager, then with each decoder layer compiled (--compile; not yet measured on a GPU;
             # the Triton path at 1b only: its kernels are ops in the compiled graph, autotuned in the warm-up)
    loss) run loss 240 python3 launch/bench_e2e.py --presets 1b --paths auto --micro-batch 16 \
            --activation-checkpointing --loss-chunk-size 1024 0 --steps 6 --out "$OUT/e2e_loss_chunk.json" ;;
          # the chunked loss (first) and the full logits: tokens/s and peak memory, with activation checkpointing
    ckpt) run ckpt 240 bash -c 'for p in full selective; do python3 launch/bench_e2e.py --presets 1b --paths auto \
            --micro-batch 16 --activation-checkpointing --activation-checkpointing-policy $p --steps 6 \
            --out "$1/e2e_ckpt_$p.json"; done; python3 launch/bench_e2e.py --presets 1b --paths auto --micro-batch 16 \
            --steps 6 --out "$1/e2e_ckpt_none.json"' _ "$OUT" ;;
          # activation checkpointing full vs selective vs none at 1b: step time and peak memory (not yet measured)
    host) run host 90 bash -c 'python3 launch/bench_host_overhead.py --device cuda --out "$1/host_overhead.json"; \
            python3 launch/bench_host_overhead.py --device cuda --M 16384 --d 2048 --out "$1/host_overhead.json"' _ "$OUT" ;;
    tune) run tune 200 python3 launch/tune_kernels.py --out "$OUT/tune_kernels.json" ;;
    ds)
      if ! python3 -c "import deepspeed" 2>/dev/null; then
        [ -d .whl ] || { echo "ds: no .whl/ (run scripts/gpu_wheels.sh here and carry .whl)" | tee -a "$OUT/stages.txt"; pack; continue; }
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site:$PYTHONPATH"
      fi
      run ds 200 env RELORA_KERNELS=auto python3 launch/bench_memory_ds.py --preset 1b --deepspeed ds_configs/zero2.json \
        --bases bf16 int8 full --out "$OUT/memory_ds.json"  # full last: a cut keeps the ReLoRA rows
      # ZeRO-3 eager, then --compile (each layer gathered whole around its graph; not yet run on a GPU)
      run ds_zero3 240 env RELORA_KERNELS=auto bash -c 'for c in "" --compile; do python3 launch/bench_memory_ds.py \
        --preset 1b --deepspeed ds_configs/zero3.json --bases bf16 $c --out "$1/memory_ds_zero3${c:+_compiled}.json"; \
        done' _ "$OUT" ;;
  esac
done
if (( ${#failed[@]} )); then
  echo "failed stages: ${failed[*]} (their logs: \$OUT/gpu_check.tar.gz)" >&2
  exit 1
fi
