#!/usr/bin/env bash
# Build .whl/: DeepSpeed and the packages it needs that the GPU image lacks (Python 3.12, x86-64; the image
# list is in ../.library/device/KINDS.md). DeepSpeed ships as an sdist, so its wheel is built here; the rest
# are downloaded as manylinux wheels. .whl/ is git-ignored (.git/info/exclude) and travels with a device
# call only when named in `carry`:
#   bash scripts/gpu_wheels.sh            (here: it installs from the package index, which the device cannot reach)
#   device run: carry [".whl"], command "bash launch/gpu_check.sh ds"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
source scripts/setup_env.sh >/dev/null
rm -rf .whl && mkdir .whl  # two versions of one package in .whl/ would break the device's `pip install .whl/*.whl`
python -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
# The versions this machine's DeepSpeed runs with (the tests' set): pydantic checks at import that pydantic-core
# is the version it was released with, so an unpinned pair can break `import deepspeed` on the device.
pins=$(python - <<'PY'
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in ("hjson", "pydantic", "pydantic-core", "annotated-types",
                                                 "typing-inspection", "typing-extensions")))
PY
)
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins
ls -la .whl && du -sh .whl
