#!/usr/bin/env bash
# Makes a GPU-less machine able to link the candle-cuda binaries, and prints
# the CUDA root to build them with (CUDA_HOME). Idempotent.
#
# candle links the CUDA libraries at build time (cudarc's dynamic-linking):
# libcuda, libcudart, libcublas, libcublasLt, libcurand and libnvrtc. On top
# of scripts/install-nvcc.sh's venv this installs the 13.0-line wheels of the
# last four (about 1 GB unpacked), gives each the unversioned name the linker
# looks for, and builds a libcuda stub: the driver comes with the GPU's
# driver package, never from PyPI, so the stub only has to resolve the
# driver functions at link time. Its soname is libcuda.so.1, the driver's,
# so the binaries load the real driver on the GPU machine. The stub is
# generated from cudarc's own driver bindings (every `cu*` function they
# declare), so it follows a cudarc upgrade by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/venv.sh
. scripts/lib/cuda-link-libs.sh
venv=.venv-nvcc
root="$(dirname "$(scripts/install-nvcc.sh)")" # .../nvidia/cu13
lib="$root/lib"

# Same line as the compiler (13.0 update 2) and the GPUs' toolkit: each keeps
# its soname across 13.x, and linking against a newer one could bind a
# symbol the device's 13.0 libraries lack.
if ! ls "$lib"/libcublasLt.so.13 "$lib"/libcurand.so.10 "$lib"/libnvrtc.so.13 >/dev/null 2>&1; then
  venv_install "$venv" "nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.0.35" \
    "nvidia-cuda-nvrtc==13.0.88"
fi
for versioned in "${CUDA_LINK_LIBS[@]}"; do
  [ -f "$lib/$versioned" ] || { echo "install-cuda-link-libs: $lib/$versioned missing after install" >&2; exit 1; }
  ln -sfn "$versioned" "$lib/${versioned%.so.*}.so"
done

# The stub, rebuilt whenever cudarc's bindings move (a cudarc upgrade).
stub="$lib/stubs/libcuda.so"
bindings="$(cargo metadata --locked --format-version 1 --no-default-features \
  --features candle-cuda | python3 -c 'import json, os, sys
m = json.load(sys.stdin)
[cudarc] = [p for p in m["packages"] if p["name"] == "cudarc"]
print(os.path.join(os.path.dirname(cudarc["manifest_path"]), "src/driver/sys/mod.rs"))')"
if [ ! -f "$stub" ] || [ "$(cat "$stub.source" 2>/dev/null)" != "$bindings" ]; then
  mkdir -p "$lib/stubs"
  source_file="$lib/stubs/libcuda-stub.c"
  # Each function returns CUDA_ERROR_UNKNOWN (999): a stub that is loaded by
  # mistake fails every call instead of pretending to work.
  python3 - "$bindings" >"$source_file" <<'EOF'
import re, sys
names = sorted(set(re.findall(r"^pub unsafe fn (cu[A-Za-z0-9_]+)\(", open(sys.argv[1]).read(), re.M)))
if len(names) < 100:
    sys.exit(f"install-cuda-link-libs: only {len(names)} driver functions found in {sys.argv[1]}")
print("/* Link-time stand-in for libcuda.so.1, generated from cudarc's bindings. */")
for name in names:
    print(f"int {name}(void) {{ return 999; }}")
EOF
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$source_file"
  echo "$bindings" >"$stub.source"
fi
echo "$root"
