#!/usr/bin/env bash
# The README's test command: sets up everything on a fresh machine, then runs the whole suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
# DeepSpeed's async_io op, which NVMe offload runs on (tests/test_nvme_offload.py), builds against libaio.
if [ ! -f /usr/include/libaio.h ] && command -v apt-get >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q libaio-dev >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q libaio-dev >/dev/null 2>&1; } \
    || echo "scripts/test.sh: could not install libaio-dev; tests/test_nvme_offload.py will fail" >&2
fi
# DeepSpeed's JIT ops, built once with the whole machine (~6.5 min on 2 fresh cores; seconds once built).
python scripts/build_ds_ops.py
# Two workers, a whole test file each, heaviest first (tests/conftest.py; --no-loadscope-reorder keeps that
# order, xdist would sort files by test count): on 2 cores a 2-rank run leaves a core idle ~35% of the time
# (start-up, gloo waits), and in-process tests run beside it. RELORA_TEST_WORKERS=0: one process.
python -m pytest -q -rs --durations=30 -n "${RELORA_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder tests "$@"
