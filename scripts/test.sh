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
# Two workers (a whole test file each, heaviest first: tests/conftest.py): on CI's 2 cores the 2-rank runs
# leave a core idle ~40% of the time (start-up, gloo waits); serial the suite took ~1.75x as long.
python -m pytest -q -rs -n "${RELORA_TEST_WORKERS:-2}" --dist loadfile tests "$@"
