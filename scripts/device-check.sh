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
# (AUTOFOCUS_REQUIRE_GPU=1: no silent fallback to the emulator alone),
# the golden tests again on kernels compiled by NVRTC (AUTOFOCUS_KERNELS=nvrtc),
# an ncu run filtered by NVTX range (stage1/block0/attn.cluster_attention/),
# compute-sanitizer memcheck and racecheck over the kernel tests, the kernel
# benchmarks (attention, stage-0 layout), the candle backend's tests and one
# candle training step on the GPU, `autofocus bench --device cuda` on
# aff_mini (plus a per-op profile), the card's copy and matmul ceilings
# (through PyTorch), and an ncu summary of the main kernels. Expect about
# 5 to 8 minutes of device time; the emulator is skipped there (CI runs it).
# Copy the report's numbers into docs/gpu.md with the card and the date.
set -euo pipefail
cd "$(dirname "$0")/.."

build() {
  NVCC="$(scripts/install-nvcc.sh)/nvcc"
  export NVCC AUTOFOCUS_REQUIRE_CUDA=1 CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  rm -rf device-bin && mkdir -p device-bin
  cargo build --release --locked
  cp target/release/autofocus device-bin/
  # Test and bench executables, found from cargo's JSON messages.
  cargo test --release --locked --no-run --test kernels --test device_model --test backward --message-format=json \
    | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["executable"])' \
    | while read -r name exe; do cp "$exe" "device-bin/test-$name"; done
  cargo bench --locked --no-run --bench kernels --message-format=json \
    | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])' \
    | while read -r exe; do cp "$exe" device-bin/bench-kernels; done
  # The candle backend on candle's GPU (feature candle-cuda, which builds
  # candle's own kernels with the same nvcc: about 15 minutes the first
  # time on two cores), in its own target folder.
  PATH="$(dirname "$NVCC"):$PATH" CARGO_TARGET_DIR=target/candle-cuda \
    cargo test --release --locked --no-default-features --features candle-cuda --no-run \
    --test candle --test candle_model --bench candle_model --message-format=json \
    | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        kind = "bench" if "bench" in m["target"]["kind"] else "test"
        print(kind, m["target"]["name"], m["executable"])' \
    | while read -r kind name exe; do cp "$exe" "device-bin/$kind-candle-cuda-$name"; done
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

run() {
  if [ ! -d device-bin ] && [ -f device-bin.tar.gz ]; then
    tar -xzf device-bin.tar.gz
  fi
  out="${OUT:-device-report}"
  mkdir -p "$out"
  report="$out/report.md"
  export CARGO_MANIFEST_DIR="$PWD" AUTOFOCUS_REQUIRE_GPU=1 AUTOFOCUS_REQUIRE_SHARED_GOLDEN=0
  status=0
  step() { # step NAME COMMAND...: runs, logs to $out/NAME.log, records pass/fail
    local name="$1"; shift
    local start=$SECONDS
    if "$@" >"$out/$name.log" 2>&1; then
      echo "- $name: pass ($((SECONDS - start)) s)" >>"$report"
    else
      echo "- $name: FAIL, exit $? ($((SECONDS - start)) s; see $name.log)" >>"$report"
      status=1
    fi
  }
  {
    echo "# Device check, $(date -u +%Y-%m-%d)"
    echo
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    echo
  } >"$report"
  # cuBLASLt: the toolkit's, else a pip wheel's (PyTorch's), named for the
  # crate; the dense layers use it unless AUTOFOCUS_GEMM=simt.
  if [ -z "${AUTOFOCUS_CUBLASLT:-}" ]; then
    AUTOFOCUS_CUBLASLT="$(ls /usr/local/cuda/lib64/libcublasLt.so.* 2>/dev/null | head -n 1)"
    [ -n "$AUTOFOCUS_CUBLASLT" ] || AUTOFOCUS_CUBLASLT="$(python3 -c '
import glob, site
found = [p for d in site.getsitepackages() for p in glob.glob(d + "/nvidia/*/lib/libcublasLt.so.*")]
print(sorted(found)[-1] if found else "")' 2>/dev/null || true)"
  fi
  [ -n "$AUTOFOCUS_CUBLASLT" ] && export AUTOFOCUS_CUBLASLT
  echo "cuBLASLt: ${AUTOFOCUS_CUBLASLT:-none found}" >>"$report"
  step kernel-tests device-bin/test-kernels --test-threads=1
  # The dense layers on cuBLASLt (forced: a load failure fails the step)
  # and on the SIMT kernel, each against the goldens (f32 within 1e-4).
  step golden-on-gpu env AUTOFOCUS_GEMM=cublaslt device-bin/test-device_model --test-threads=1 --nocapture
  step golden-on-gpu-simt env AUTOFOCUS_GEMM=simt device-bin/test-device_model --test-threads=1
  step linear-cublaslt env AUTOFOCUS_GEMM=cublaslt device-bin/test-kernels linear --test-threads=1
  # CUDA graphs: replays against plain launches, bit for bit (part of the
  # golden run above too; here alone, for its own line in the report).
  step graph-vs-launches device-bin/test-device_model graph_replays --test-threads=1
  # The NVRTC path forced (the old-driver fallback): the golden cases again
  # on cubins compiled there, through a fresh cache, then from that cache.
  nvrtc_lib="${AUTOFOCUS_NVRTC:-$(ls /usr/local/cuda/lib64/libnvrtc.so.* 2>/dev/null | head -n 1)}"
  kernel_cache="${TMPDIR:-/tmp}/autofocus-kernel-cache"
  rm -rf "$kernel_cache"
  for pass in compile cached; do
    step "golden-nvrtc-$pass" env AUTOFOCUS_KERNELS=nvrtc AUTOFOCUS_CACHE_DIR="$kernel_cache" \
      ${nvrtc_lib:+AUTOFOCUS_NVRTC="$nvrtc_lib"} device-bin/test-device_model --test-threads=1
  done
  step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 device-bin/test-kernels --test-threads=1
  step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 device-bin/test-kernels --test-threads=1
  step backward-tests device-bin/test-backward --test-threads=1
  step backward-memcheck compute-sanitizer --tool memcheck --error-exitcode 1 device-bin/test-backward kernels --test-threads=1
  step backward-racecheck compute-sanitizer --tool racecheck --error-exitcode 1 device-bin/test-backward kernels --test-threads=1
  # The candle backend: its custom ops and the whole candle model (goldens
  # and gradients) on candle's GPU, then one bf16 training step of aff_tiny.
  step candle-ops-gpu device-bin/test-candle-cuda-candle --test-threads=1
  step candle-golden-gpu device-bin/test-candle-cuda-candle_model --test-threads=1
  step candle-train-step device-bin/bench-candle-cuda-candle_model --bench training_step
  step attention-bench device-bin/bench-kernels --bench --warm-up-time 1 --measurement-time 3
  for dtype in f32 bf16; do
    for gemm in cublaslt simt; do
      step "bench-aff_mini-$dtype-$gemm" env AUTOFOCUS_GEMM=$gemm device-bin/autofocus bench \
        --device cuda --dtype "$dtype" --config aff_mini --batch 256 --size 224 --iters 5 \
        --warmup 2 --json
    done
  done
  # The same without the graph: launches one by one.
  step bench-aff_mini-bf16-no-graph device-bin/autofocus bench --device cuda --dtype bf16 \
    --config aff_mini --batch 256 --size 224 --iters 5 --warmup 2 --json --no-graph
  # One stream of batches, copies overlapping the kernels (pinned memory,
  # a second stream), against the same forwards one at a time above.
  step bench-aff_mini-bf16-overlap device-bin/autofocus bench --device cuda --dtype bf16 \
    --config aff_mini --batch 256 --size 224 --iters 10 --warmup 2 --json --overlap
  step overlapped-batches device-bin/test-device_model overlapped --test-threads=1
  step overlapped-memcheck compute-sanitizer --tool memcheck --error-exitcode 1 \
    device-bin/test-device_model overlapped --test-threads=1
  step profile-aff_mini-bf16 device-bin/autofocus bench --device cuda --dtype bf16 \
    --config aff_mini --batch 256 --size 224 --iters 2 --warmup 1 --profile
  # A dataset run over every GPU (one worker each) against the CPU: same
  # lines but for the last digits of the probabilities.
  step dataset-cuda-all scripts/dataset-check.sh device-bin/autofocus cuda:all "$out/dataset"
  # The card's two ceilings, measured (METHOD.md): a large device copy and a
  # large bf16 matrix product, through the PyTorch installed there.
  step ceilings timeout 120 python3 -c '
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
  # One Nsight Compute summary of the model's main kernels.
  step ncu timeout 300 ncu --clock-control none --section SpeedOfLight --launch-count 12 \
    -k "regex:cluster_attention|linear|pointconv_merge|stable_sort|nearest_neighbourhoods" \
    device-bin/autofocus bench --device cuda --dtype bf16 --config aff_mini --batch 64 \
    --size 224 --iters 1 --warmup 0
  # NVTX ranges as ncu sees them: only the kernels inside one block's
  # attention range are profiled, so the log must name the attention kernel.
  step ncu-nvtx timeout 120 bash -c 'ncu --clock-control none --nvtx \
    --nvtx-include "stage1/block0/attn.cluster_attention/" --launch-count 1 \
    device-bin/autofocus bench --device cuda --config aff_mini --batch 8 --size 224 \
    --iters 1 --warmup 0 | tee /dev/stderr | grep -q cluster_attention'
  {
    echo
    echo "## Attention (aff_tiny stage 0, b = 64) and stage-0 layout (b = 64, 224²)"
    grep -E "time:|thrpt:|cluster_attention|stage0_layout|stable_sort" "$out/attention-bench.log" || true
    echo
    echo "## candle: aff_tiny training step (224, batch 64, bf16)"
    grep -E "time:|thrpt:" "$out/candle-train-step.log" || true
    echo
    echo "## Whole model"
    tail -n 1 "$out"/bench-aff_mini-*.log || true
    echo
    echo "## Per op (bf16, batch 256, synchronised per op)"
    grep -A 16 "op (per forward)" "$out/profile-aff_mini-bf16.log" || true
    echo
    echo "## Ceilings"
    cat "$out/ceilings.log" || true
    echo
    echo "## ncu (SpeedOfLight)"
    grep -E "cluster_attention|linear_|pointconv|stable_sort|nearest|Memory Throughput|Compute \(SM\) Throughput|Duration" "$out/ncu.log" | head -60 || true
    echo
    echo "## half precision agreement"
    grep -h "max error" "$out/golden-on-gpu.log" || true
  } >>"$report"
  cat "$report"
  return $status
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
