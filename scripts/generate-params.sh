#!/usr/bin/env bash
# Regenerates src/gpu/params/generated.rs from kernels/params.h with bindgen
# (tools/params-gen), or with --check fails when it is stale (CI). libclang
# comes from PyPI into .venv-tools: no system clang needed. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/venv.sh
venv=.venv-tools
ensure_venv "$venv" >/dev/null
if ! "$venv/bin/python" -c 'import clang' 2>/dev/null; then
  venv_install "$venv" libclang==18.1.1
fi
LIBCLANG_PATH="$("$venv/bin/python" -c 'import clang, os; print(os.path.join(os.path.dirname(clang.__file__), "native"))')"
export LIBCLANG_PATH
mkdir -p src/gpu/params
cargo run --locked --quiet --manifest-path tools/params-gen/Cargo.toml -- \
  kernels/params.h src/gpu/params/generated.rs "$@"
