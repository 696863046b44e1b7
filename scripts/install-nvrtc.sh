#!/usr/bin/env bash
# Installs CUDA 12's NVRTC from PyPI into .venv-nvcc (no GPU or driver
# needed) and prints the path of its libnvrtc.so.12. It is the compiler the
# GPU path falls back to on drivers older than 580 (src/gpu/nvrtc.rs), so CI
# compiles every kernel with it too (tests/nvrtc.rs). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-nvcc
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
lib="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"
if [ ! -f "$lib" ]; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check "nvidia-cuda-nvrtc-cu12==12.4.127" >&2
fi
echo "$lib"
