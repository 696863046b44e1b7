#!/usr/bin/env bash
# A dataset run on DEVICE (e.g. cuda:all: one worker per GPU) against the
# CPU over 96 copies of the bundled photos: every line present, the same
# top-1 class, its probability within 1e-4.
#   scripts/dataset-check.sh BINARY DEVICE WORKDIR
set -euo pipefail
bin=$1 device=$2 dir=$3
weights=tests/data/tiny-128.weights.safetensors
mkdir -p "$dir/photos"
for i in $(seq -w 0 31); do
  for f in assets/images/*.png assets/images/*.jpg; do
    cp "$f" "$dir/photos/$i-$(basename "$f")"
  done
done
rm -f "$dir/preds-device.jsonl" "$dir/preds-cpu.jsonl"
"$bin" classify --weights "$weights" "$dir/photos" --device "$device" --batch 32 --out "$dir/preds-device.jsonl"
"$bin" classify --weights "$weights" "$dir/photos" --device cpu --batch 32 --out "$dir/preds-cpu.jsonl"
python3 - "$dir/preds-device.jsonl" "$dir/preds-cpu.jsonl" <<'PY'
import json, sys
device = [json.loads(l) for l in open(sys.argv[1])]
cpu = [json.loads(l) for l in open(sys.argv[2])]
assert len(device) == len(cpu) == 96, (len(device), len(cpu))
bad = [a["path"] for a, b in zip(device, cpu)
       if a["path"] != b["path"]
       or a["top"][0]["index"] != b["top"][0]["index"]
       or abs(a["top"][0]["prob"] - b["top"][0]["prob"]) > 1e-4]
print(f"96 images: {len(bad)} differ from the CPU")
sys.exit(1 if bad else 0)
PY
