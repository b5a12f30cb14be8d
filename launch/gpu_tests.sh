#!/usr/bin/env bash
# The compiled (un-interpreted) kernel tests of a lent GPU, in the order that keeps the most from a run cut at its
# time limit (launch/gpu_check.sh's `tests` stage): each group is its own pytest process, so a sticky CUDA fault
# (an illegal address in a kernel that never ran on a GPU) costs only its group.
#   1. int8 (never compiled on a GPU), 2. the few cheap cases added since the H100 run of 2026-11-22 or never run
#   there (merge, deterministic, autocast, double backward, strides, the tiny training run), 3. dispatch and
#   FSDP2's host buffers (1 rank, NCCL),
#   4. the cuBLAS low-rank candidate, 5. the paths that passed on that H100, 6. TMA last (the slowest to compile:
#   five configs per GEMM, and the likeliest to fault).
# Arguments go to every pytest call (tests/test_kernel_scripts.py checks with --collect-only that the groups
# hold every CUDA case of tests/test_kernels.py exactly once). Exit status: nonzero if any group failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
first="merge or deterministic or autocast or tiny_training or double_backward or strided"
# The TMA cases by their names ("-tma]" ids, test_tma_*), not the bare word: pytest 9.1.1 (the GPU image's)
# matches -k words against the module's `pytestmark` too, so "tma" selected every case there (2026-12-04).
tma="tma] or test_tma_"
t=(python3 -m pytest -v --tb=line -p no:cacheprovider)
status=0
"${t[@]}" -k cuda tests/test_int8_quant.py "$@" || status=1
"${t[@]}" -k "cuda and ($first)" tests/test_kernels.py "$@" || status=1
env -u RELORA_KERNELS "${t[@]}" tests/test_kernel_dispatch.py "$@" || status=1
"${t[@]}" -k cuda tests/test_fsdp.py "$@" || status=1
"${t[@]}" -k "cuda and blas_lr and not ($first)" tests/test_kernels.py "$@" || status=1
"${t[@]}" -k "cuda and not ($tma or blas_lr or $first)" tests/test_kernels.py "$@" || status=1
"${t[@]}" -k "cuda and ($tma) and not ($first)" tests/test_kernels.py "$@" || status=1
exit $status
