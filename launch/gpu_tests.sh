#!/usr/bin/env bash
# The compiled (un-interpreted) kernel tests of a lent GPU, in the order that keeps the most from a run cut at its
# time limit (launch/gpu_check.sh's `tests` stage): each group is its own pytest process, so a sticky CUDA fault
# (an illegal address in a kernel that never ran on a GPU) costs only its group. Since the H200 run of 2026-12-04
# (BENCHMARKS.md), what it did not reach comes first:
#   1. the layer against the twin (fused, split dB, deterministic; its large shapes r=256 and 1024x1024x2048 r=64
#   not yet run there), 2. the cuBLAS low-rank candidate, 3. TMA (the slowest to compile: five configs per GEMM),
#   4. FSDP2's host buffers (1 rank, NCCL); then the groups that passed there: 5. int8, 6. the cheap cases
#   (merge, deterministic, autocast, double backward, strides, the tiny training run); 7. the layer's registered
#   ops (opcheck; new since that run), 8. dispatch.
# Arguments go to every pytest call (tests/test_kernel_scripts.py checks with --collect-only that the groups
# hold every CUDA case of tests/test_kernels.py exactly once). Exit status: nonzero if any group failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
first="merge or deterministic or autocast or tiny_training or double_backward or strided"
# The TMA cases by their names ("-tma]" ids, test_tma_*), not the bare word: pytest 9.1.1 (the GPU image's)
# matches -k words against each test's `pytestmark` attribute too, so "tma" selected every case there (2026-12-04).
tma="tma] or test_tma_"
t=(python3 -m pytest -v --tb=line -p no:cacheprovider)
status=0
"${t[@]}" -k "cuda and not ($tma or blas_lr or $first)" tests/test_kernels.py "$@" || status=1
"${t[@]}" -k "cuda and blas_lr and not ($first)" tests/test_kernels.py "$@" || status=1
"${t[@]}" -k "cuda and ($tma) and not ($first)" tests/test_kernels.py "$@" || status=1
"${t[@]}" -k cuda tests/test_fsdp.py "$@" || status=1
"${t[@]}" -k cuda tests/test_int8_quant.py tests/test_int8_review.py "$@" || status=1
"${t[@]}" -k "cuda and ($first)" tests/test_kernels.py "$@" || status=1
"${t[@]}" -k cuda tests/test_kernel_ops.py "$@" || status=1
env -u RELORA_KERNELS "${t[@]}" tests/test_kernel_dispatch.py tests/test_kernel_args.py "$@" || status=1
exit $status
