#!/usr/bin/env bash
# Installs nvcc 13.0 from PyPI into .venv-nvcc (no GPU or driver needed) and
# prints the directory holding `nvcc`; the GPUs we run on have a CUDA 13.0
# driver, so the compiler is pinned to match. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/venv.sh
venv=.venv-nvcc
bin="$(ensure_venv "$venv")/nvidia/cu13/bin"
if [ ! -x "$bin/nvcc" ]; then
  venv_install "$venv" nvidia-cuda-nvcc==13.0.88 "nvidia-cuda-runtime==13.0.*" \
    "nvidia-cuda-cccl==13.0.*" "nvidia-nvvm==13.0.*"
fi
echo "$bin"
