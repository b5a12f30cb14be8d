#!/usr/bin/env bash
# The README's test command: sets up everything on a fresh machine, then runs the whole suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
python -m pytest -q -rs tests "$@"
