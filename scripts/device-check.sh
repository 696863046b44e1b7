#!/usr/bin/env bash
# The GPU check, in two halves, because the GPU machine has no Rust:
#
#   scripts/device-check.sh build   # here: release test/bench binaries with
#                                   # sm_90 kernels, copied into device-bin/
#                                   # and packed into device-bin.tar.gz
#   scripts/device-check.sh run     # on the GPU machine, from the repo root:
#                                   # writes $OUT/report.md (default ./device-report)
#
# Carry device-bin.tar.gz to the GPU machine (the device tool carries at
# most 64 MiB; the candle-cuda binaries embed candle's PTX, which gzip
# shrinks several times); `run` unpacks it when device-bin/ is absent.
#
# `run` executes every kernel test and the golden end-to-end tests on GPU 0
# (AUTOFOCUS_REQUIRE_GPU=1: no silent fallback to the emulator alone), the
# headline benchmarks (aff_mini through `autofocus bench --device cuda`, the
# attention and stage-0 layout kernels, the backward kernels against their
# forward, the card's copy and matmul ceilings through PyTorch),
# compute-sanitizer memcheck and racecheck over the kernel
# tests, the candle backend's tests and one candle training step on the GPU,
# the golden tests again on the SIMT GEMM and on kernels compiled by NVRTC
# (AUTOFOCUS_KERNELS=nvrtc), graph-less and overlapped timings, a per-op
# profile, and ncu (a summary of the main kernels, and a run filtered by the
# NVTX range stage1/block0/attn.cluster_attention/), in that order. Each step
# has a cap, and none starts after DEVICE_CHECK_BUDGET_S (420 s by default):
# the device tool stops a command at 600 s, so the report always comes back,
# listing the steps skipped; `run REGEX` runs only the steps whose names
# match, for a second call. The emulator is skipped there (CI runs it).
# Copy the report's numbers into docs/gpu.md with the card and the date.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/cuda-link-libs.sh

# Reads cargo's JSON messages on stdin: prints "KIND NAME PATH" for each
# test or bench executable built, and each compiler error, rendered, on
# stderr (cargo's own summary line alone does not say what failed).
executables() {
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    kinds = m.get("target", {}).get("kind", [])
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bin" not in kinds:
        kind = "bench" if "bench" in kinds else "test"
        print(kind, m["target"]["name"], m["executable"])
    elif m.get("reason") == "compiler-message" and m["message"].get("level") == "error":
        print(m["message"]["rendered"], file=sys.stderr)'
}

build() {
  NVCC="$(scripts/install-nvcc.sh)/nvcc"
  export NVCC AUTOFOCUS_REQUIRE_CUDA=1 CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  rm -rf device-bin && mkdir -p device-bin
  cargo build --release --locked
  cp target/release/autofocus device-bin/
  cargo test --release --locked --no-run --test kernels --test device_model --test backward \
    --bench kernels --message-format=json \
    | executables | while read -r kind name exe; do cp "$exe" "device-bin/$kind-$name"; done
  # The candle backend on candle's GPU (feature candle-cuda, which builds
  # candle's own kernels with the same nvcc: about 12 minutes the first
  # time on two cores), in its own target folder. candle links the CUDA
  # libraries at build time (cudarc's dynamic-linking), which come from
  # wheels and a libcuda stub here (scripts/install-cuda-link-libs.sh); if
  # these binaries still fail, they are left out, said so, and the run's
  # candle steps fail alone.
  local cuda_root
  if ! cuda_root="$(scripts/install-cuda-link-libs.sh)"; then
    echo "device-check build: no CUDA libraries to link the candle-cuda binaries with" >&2
    cuda_root=""
  fi
  if [ -z "$cuda_root" ] || ! PATH="$(dirname "$NVCC"):$PATH" CUDA_HOME="$cuda_root" \
    CARGO_TARGET_DIR=target/candle-cuda \
    cargo test --release --locked --no-default-features --features candle-cuda --no-run \
    --test candle --test candle_model --bench candle_model --message-format=json \
    | executables | while read -r kind name exe; do cp "$exe" "device-bin/$kind-candle-cuda-$name"; done
  then
    echo "device-check build: the candle-cuda binaries did not build (errors above);" \
      "device-bin holds the crate's own binaries only" >&2
  fi
  strip device-bin/* 2>/dev/null || true
  du -sh device-bin
  tar -czf device-bin.tar.gz device-bin
  du -h device-bin.tar.gz
  local bytes
  bytes=$(stat -c %s device-bin.tar.gz)
  if [ "$bytes" -gt $((64 * 1024 * 1024)) ]; then
    echo "device-bin.tar.gz is over 64 MiB: carry device-bin in two calls, or drop" \
      "the candle-cuda binaries (the steps that need them fail alone)" >&2
  fi
}

# cuda_lib GLOB: the first file matching GLOB in the toolkit's lib64, else
# the newest in a pip wheel's nvidia/*/lib (PyTorch's); empty when none.
cuda_lib() {
  python3 - "$1" 2>/dev/null <<'EOF' || true
import glob, site, sys
toolkit = sorted(glob.glob("/usr/local/cuda/lib64/" + sys.argv[1]))
wheels = sorted(p for d in site.getsitepackages() for p in glob.glob(d + "/nvidia/*/lib/" + sys.argv[1]))
print((toolkit[:1] or wheels[-1:] or [""])[0])
EOF
}

run() {
  local only="${1:-}"
  if [ ! -d device-bin ] && [ -f device-bin.tar.gz ]; then
    tar -xzf device-bin.tar.gz
  fi
  out="${OUT:-device-report}"
  mkdir -p "$out"
  report="$out/report.md"
  export CARGO_MANIFEST_DIR="$PWD" AUTOFOCUS_REQUIRE_GPU=1 AUTOFOCUS_REQUIRE_SHARED_GOLDEN=0
  # The device tool stops a command at 600 s and lends 15 minutes in all,
  # machine start included, so the steps run most valuable first, each under
  # its own cap, and none starts once the budget is spent: the report always
  # comes back, naming what was skipped, to be run by a second call
  # (`run 'REGEX'` runs only the steps whose names match).
  local budget="${DEVICE_CHECK_BUDGET_S:-420}"
  status=0 passed=0 failed=0 skipped=0
  step() { # step NAME CAP_SECONDS COMMAND...: logs to $out/NAME.log
    local name="$1" cap="$2"; shift 2
    if [ -n "$only" ] && ! [[ "$name" =~ $only ]]; then
      return 0
    fi
    local left=$((budget - SECONDS))
    if [ "$left" -lt 15 ]; then
      echo "- $name: skipped (budget of $budget s spent)" >>"$report"
      skipped=$((skipped + 1)) status=1
      return 0
    fi
    [ "$cap" -le "$left" ] || cap=$left
    local start=$SECONDS rc=0
    timeout -k 10 "$cap" "$@" >"$out/$name.log" 2>&1 || rc=$?
    if [ "$rc" -eq 0 ]; then
      echo "- $name: pass ($((SECONDS - start)) s)" >>"$report"
      passed=$((passed + 1))
      return 0
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      echo "- $name: FAIL, stopped at its cap of $cap s; see $name.log" >>"$report"
    else
      echo "- $name: FAIL, exit $rc ($((SECONDS - start)) s; see $name.log)" >>"$report"
    fi
    failed=$((failed + 1)) status=1
  }
  {
    echo "# Device check, $(date -u +%Y-%m-%d)"
    echo
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    echo
  } >"$report"
  # cuBLASLt: the toolkit's, else a pip wheel's (PyTorch's), named for the
  # crate; the dense layers use it unless AUTOFOCUS_GEMM=simt.
  [ -n "${AUTOFOCUS_CUBLASLT:-}" ] || AUTOFOCUS_CUBLASLT="$(cuda_lib 'libcublasLt.so.*')"
  [ -z "$AUTOFOCUS_CUBLASLT" ] || export AUTOFOCUS_CUBLASLT
  echo "cuBLASLt: ${AUTOFOCUS_CUBLASLT:-none found}" >>"$report"
  # (`|| true`: under pipefail a glob that matches nothing would end the
  # script here.)
  nvrtc_lib="${AUTOFOCUS_NVRTC:-$( (ls /usr/local/cuda/lib64/libnvrtc.so.* 2>/dev/null || true) | head -n 1)}"
  # The candle-cuda binaries link the CUDA libraries instead of loading them:
  # the loader needs their folders (the driver, libcuda.so.1, is the
  # system's).
  local candle_libs="" missing="" lib path
  for lib in "${CUDA_LINK_LIBS[@]}"; do
    path="$(cuda_lib "$lib")"
    if [ -z "$path" ]; then
      missing="$missing $lib"
    elif [[ ":$candle_libs:" != *":$(dirname "$path"):"* ]]; then
      candle_libs="${candle_libs:+$candle_libs:}$(dirname "$path")"
    fi
  done
  [ -z "$missing" ] || echo "CUDA libraries missing:$missing" >>"$report"
  echo "CUDA libraries for the candle binaries: ${candle_libs:-none found}" >>"$report"
  local candle_ld="$candle_libs"
  [ -z "${LD_LIBRARY_PATH:-}" ] || candle_ld="${candle_ld:+$candle_ld:}$LD_LIBRARY_PATH"
  local candle_env=(env "LD_LIBRARY_PATH=$candle_ld")
  echo >>"$report"

  # 1. Correctness: the kernels, the golden cases end to end with the dense
  # layers on cuBLASLt (forced: a load failure fails the step; f32 within
  # 1e-4), the backward kernels.
  step kernel-tests 90 device-bin/test-kernels --test-threads=1
  step golden-on-gpu 150 env AUTOFOCUS_GEMM=cublaslt device-bin/test-device_model --test-threads=1 --nocapture
  step backward-tests 90 device-bin/test-backward --test-threads=1
  # 2. The headline numbers: aff_mini at batch 256, the attention and
  # layout benchmarks, the card's ceilings to judge them by.
  local mini=(device-bin/autofocus bench --device cuda --config aff_mini --batch 256 --size 224
    --warmup 2 --json)
  for dtype in bf16 f32; do
    step "bench-aff_mini-$dtype-cublaslt" 60 env AUTOFOCUS_GEMM=cublaslt "${mini[@]}" \
      --dtype "$dtype" --iters 5
  done
  # (with the backward kernels against their forward, issue #10's ratios)
  step attention-bench 200 device-bin/bench-kernels --bench --warm-up-time 1 --measurement-time 3
  # The card's two ceilings, measured (METHOD.md): a large device copy and a
  # large bf16 matrix product, through the PyTorch installed there.
  step ceilings 60 python3 -c '
import torch
def ms(f, reps=20):
    f(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps): f()
    b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) / reps
x = torch.empty(1 << 28, dtype=torch.float32, device="cuda"); y = torch.empty_like(x)
t = ms(lambda: y.copy_(x)); print(f"copy: {2 * x.numel() * 4 / t / 1e9:.0f} GB/s (read + write)")
m = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
t = ms(lambda: m @ m, 10); print(f"bf16 matmul: {2 * 8192**3 / t / 1e9:.0f} TFLOP/s")'
  # 3. What only a GPU's tools show: out-of-bounds accesses and races.
  step memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 1 device-bin/test-kernels --test-threads=1
  step racecheck 120 compute-sanitizer --tool racecheck --error-exitcode 1 device-bin/test-kernels --test-threads=1
  step backward-memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 1 device-bin/test-backward kernels --test-threads=1
  step backward-racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 1 device-bin/test-backward kernels --test-threads=1
  # 4. The candle backend: its custom ops and the whole candle model (goldens
  # and gradients) on candle's GPU, then one bf16 training step of aff_tiny.
  step candle-ops-gpu 90 "${candle_env[@]}" device-bin/test-candle-cuda-candle --test-threads=1
  step candle-golden-gpu 120 "${candle_env[@]}" device-bin/test-candle-cuda-candle_model --test-threads=1
  step candle-train-step 90 "${candle_env[@]}" device-bin/bench-candle-cuda-candle_model --bench training_step
  # 5. The other paths: the SIMT GEMM, CUDA graphs against plain launches
  # (bit for bit; part of the golden run too, here for its own line), and
  # the NVRTC path forced (the old-driver fallback): the golden cases on
  # cubins compiled there, through a fresh cache, then from that cache.
  step golden-on-gpu-simt 150 env AUTOFOCUS_GEMM=simt device-bin/test-device_model --test-threads=1
  step linear-cublaslt 60 env AUTOFOCUS_GEMM=cublaslt device-bin/test-kernels linear --test-threads=1
  step graph-vs-launches 60 device-bin/test-device_model graph_replays --test-threads=1
  kernel_cache="${TMPDIR:-/tmp}/autofocus-kernel-cache"
  rm -rf "$kernel_cache"
  for pass in compile cached; do
    step "golden-nvrtc-$pass" 150 env AUTOFOCUS_KERNELS=nvrtc AUTOFOCUS_CACHE_DIR="$kernel_cache" \
      ${nvrtc_lib:+AUTOFOCUS_NVRTC="$nvrtc_lib"} device-bin/test-device_model --test-threads=1
  done
  # 6. The rest of the engine: SIMT and graph-less timings, one stream of
  # batches with copies overlapping the kernels (pinned memory, a second
  # stream), a per-op profile, and a dataset run over every GPU (one worker
  # each) against the CPU: same lines but for the last digits.
  for dtype in bf16 f32; do
    step "bench-aff_mini-$dtype-simt" 60 env AUTOFOCUS_GEMM=simt "${mini[@]}" \
      --dtype "$dtype" --iters 5
  done
  step bench-aff_mini-bf16-no-graph 60 "${mini[@]}" --dtype bf16 --iters 5 --no-graph
  step bench-aff_mini-bf16-overlap 60 "${mini[@]}" --dtype bf16 --iters 10 --overlap
  step overlapped-batches 60 device-bin/test-device_model overlapped --test-threads=1
  step overlapped-memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 1 \
    device-bin/test-device_model overlapped --test-threads=1
  step profile-aff_mini-bf16 60 device-bin/autofocus bench --device cuda --dtype bf16 \
    --config aff_mini --batch 256 --size 224 --iters 2 --warmup 1 --profile
  step dataset-cuda-all 90 scripts/dataset-check.sh device-bin/autofocus cuda:all "$out/dataset"
  # 7. Nsight Compute: a summary of the model's main kernels, and NVTX
  # ranges as ncu sees them (only the kernels inside one block's attention
  # range are profiled, so the log must name the attention kernel).
  step ncu 120 ncu --clock-control none --section SpeedOfLight --launch-count 12 \
    -k "regex:cluster_attention|linear|pointconv_merge|stable_sort|nearest_neighbourhoods" \
    device-bin/autofocus bench --device cuda --dtype bf16 --config aff_mini --batch 64 \
    --size 224 --iters 1 --warmup 0
  step ncu-nvtx 90 bash -c 'ncu --clock-control none --nvtx \
    --nvtx-include "stage1/block0/attn.cluster_attention/" --launch-count 1 \
    device-bin/autofocus bench --device cuda --config aff_mini --batch 8 --size 224 \
    --iters 1 --warmup 0 | tee /dev/stderr | grep -q cluster_attention'
  {
    echo
    echo "$passed passed, $failed failed, $skipped skipped, in $SECONDS s (budget $budget s)"
    echo
    echo "## Attention (aff_tiny stage 0, b = 64; aff_base_384 stage 0, b = 16), dense maps, backward/forward ratios and stage-0 layout"
    grep -hE "time:|thrpt:|cluster_attention|to_dense|backward_|stage0_layout|stable_sort" "$out/attention-bench.log" 2>/dev/null || true
    echo
    echo "## candle: aff_tiny training step (224, batch 64, bf16)"
    grep -hE "time:|thrpt:" "$out/candle-train-step.log" 2>/dev/null || true
    echo
    echo "## Whole model"
    tail -n 1 "$out"/bench-aff_mini-*.log 2>/dev/null || true
    echo
    echo "## Per op (bf16, batch 256, synchronised per op)"
    grep -hA 16 "op (per forward)" "$out/profile-aff_mini-bf16.log" 2>/dev/null || true
    echo
    echo "## Ceilings"
    cat "$out/ceilings.log" 2>/dev/null || true
    echo
    echo "## ncu (SpeedOfLight)"
    (grep -hE "cluster_attention|linear_|pointconv|stable_sort|nearest|Memory Throughput|Compute \(SM\) Throughput|Duration" "$out/ncu.log" 2>/dev/null || true) | head -60
    echo
    echo "## half precision agreement"
    grep -h "max error" "$out/golden-on-gpu.log" 2>/dev/null || true
  } >>"$report"
  cat "$report"
  return $status
}

case "${1:-}" in
  build) build ;;
  run) run "${2:-}" ;;
  *) echo "usage: $0 build | run [STEP-NAME-REGEX]" >&2; exit 2 ;;
esac
