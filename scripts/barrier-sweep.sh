#!/usr/bin/env bash
# Removes each `__syncthreads();` / `__syncwarp();` of kernels/*.cu in turn
# and runs the kernel tests on the emulator (tests/kernels.rs and
# tests/backward.rs), printing one line per barrier: FAIL with the tests
# that caught its removal, or PASS where none did. The emulator is meant to
# make a missing barrier show (see kernels/emulator/emulator.h), so a PASS
# is a barrier the tests cannot see; docs/gpu.md lists the expected ones.
# The tests run under the emulator's race check (ThreadSanitizer), which
# also sees a barrier missing next to a shuffle; AUTOFOCUS_EMU_RACECHECK=0
# sweeps with the thread orders alone.
#
# Works on a copy of the tree in target/barrier-sweep (the working tree is
# never edited), with its own cargo target folder so later runs rebuild
# only what a removal touches: about 25 s per barrier on two cores.
# Usage: scripts/barrier-sweep.sh [kernels/NAME.cu ...]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$root/target/barrier-sweep
mkdir -p "$work"
# The sources as they are now, committed or not (what git ignores aside).
rm -rf "$work/tree"
mkdir -p "$work/tree"
git ls-files -z --cached --others --exclude-standard \
  | tar --null --ignore-failed-read --files-from=- -cf - | tar -C "$work/tree" -xf -
export CARGO_TARGET_DIR=$work/cargo
export AUTOFOCUS_EMU_RACECHECK=${AUTOFOCUS_EMU_RACECHECK-1}
log=$work/last-run.log
sources=("$@")
[ ${#sources[@]} -gt 0 ] || sources=(kernels/*.cu)

caught=0
total=0
for source in "${sources[@]}"; do
  pristine=$work/pristine.cu
  cp "$work/tree/$source" "$pristine"
  while IFS=: read -r line _; do
    cp "$pristine" "$work/tree/$source"
    sed -i "${line}s/__syncthreads();\|__syncwarp();/;/" "$work/tree/$source"
    total=$((total + 1))
    if (cd "$work/tree" && cargo test --locked --test kernels --test backward) </dev/null >"$log" 2>&1; then
      echo "$source:$line PASS"
    elif grep -q '^error: could not compile' "$log"; then
      echo "$source:$line: the build failed (see $log)" >&2
      exit 1
    else
      # A failed test, or a test binary that crashed: either way, caught.
      caught=$((caught + 1))
      failed=$(grep -E '^test .* FAILED$' "$log" | sed 's/^test //;s/ \.\.\. FAILED$//' || true)
      echo "$source:$line FAIL" ${failed:-"(a test binary crashed; see $log)"}
    fi
  done < <(grep -n '__syncthreads();\|__syncwarp();' "$pristine")
  cp "$pristine" "$work/tree/$source"
done
echo "$caught of $total barrier removals fail a test"
