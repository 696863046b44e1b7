#!/usr/bin/env bash
# Installs CUDA 12's NVRTC from PyPI into .venv-nvcc (no GPU or driver
# needed) and prints the path of its libnvrtc.so.12. It is the compiler the
# GPU path falls back to on drivers older than 580 (src/gpu/nvrtc.rs), so CI
# compiles every kernel with it too (tests/nvrtc.rs). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/venv.sh
venv=.venv-nvcc
lib="$(ensure_venv "$venv")/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"
if [ ! -f "$lib" ]; then
  venv_install "$venv" "nvidia-cuda-nvrtc-cu12==12.4.127"
fi
echo "$lib"
