#!/usr/bin/env bash
# Installs nvcc 13.0 from PyPI into .venv-nvcc (no GPU or driver needed) and
# prints the directory holding `nvcc`; the GPUs we run on have a CUDA 13.0
# driver, so the compiler is pinned to match. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/venv.sh
venv=.venv-nvcc
bin="$(ensure_venv "$venv")/nvidia/cu13/bin"
# The host-side headers (crt) come in their own wheel, which the runtime
# wheel pulls in at its newest version unless pinned: cudafe++ 13.0 and crt
# 13.5 disagree (`__cudaLaunch` arity), which breaks any host-code build
# (candle-kernels'), so crt is pinned to the compiler's line too.
crt_version() {
  "$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("nvidia-cuda-crt"))' \
    2>/dev/null || true
}
if [ ! -x "$bin/nvcc" ] || [[ "$(crt_version)" != 13.0.* ]]; then
  venv_install "$venv" nvidia-cuda-nvcc==13.0.88 "nvidia-cuda-runtime==13.0.*" \
    "nvidia-cuda-cccl==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*"
fi
echo "$bin"
